"""The batching queue: requests wait in a bounded queue; ONE worker thread (the engine is not thread-safe)
takes the oldest, adds the waiting requests with the same generation settings (up to ``max_batch_size``
rows, a request with ``n`` choices being ``n`` rows) and answers them with one left-padded
``Engine.generate_batch``.

Streaming inside a batch: the engine's streamer gets each step's new token of every row; :class:`RowStreamer`
decodes each row on its own and hands its text to that row's request as soon as it is whole characters, so
every request streams as if it ran alone. A finished row is padded until the batch ends. A request whose
client went away (:meth:`Batcher.cancel`) gives its queue slot back at once and is skipped; in a running batch
its rows stop being sent, and the batch stops once no row is wanted any more. Seeded sampling runs alone (a
seed fixes one request's draws). If a batch fails, each of its requests is redone alone, so one bad request
never fails its batch-mates; a redo streams on from the text its client already has (greedy decoding gives a
row the same text alone as in a batch).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers.generation import BaseStreamer

from vila_hd.engine.streaming import IncrementalText
from vila_hd.serve.schema import ChatRequest

log = logging.getLogger("vila_hd.serve")


@dataclass
class Job:
    """One request in the queue. ``emit(kind, payload)`` is called from the worker thread with ``("start",
    None)`` (once per generate it takes part in), ``("delta", (choice, text))``, ``("done", results)`` or
    ``("error", exception)``. ``sent[choice]``: characters of that choice already handed out;
    ``finished[choice]``: the client needs no more of it (a stop string was hit)."""

    request: ChatRequest
    conversations: list[Any]
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: list[bool] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    queued: bool = False
    started_at: float | None = None
    first_token_at: float | None = None
    batch_rows: int = 0  # rows of the last generate this request was in

    def __post_init__(self):
        self.finished = [False] * self.rows
        self.sent = [0] * self.rows

    @property
    def rows(self) -> int:
        return len(self.conversations)

    def key(self) -> Any:
        """Requests batch together only with equal keys (seeded sampling never batches)."""
        if self.request.sampling and self.request.seed is not None:
            return ("alone", id(self))
        return self.request.options


class QueueFull(Exception):
    pass


def first_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Where the first of ``stops`` begins in ``text`` (searching from ``start``), or -1."""
    return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)


class StopText:
    """A choice's text with its stop strings cut off: :meth:`feed` returns what may be sent now (holding back
    a tail that could start a stop string)."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False

    def feed(self, chunk: str, final: bool = False) -> str:
        if self.hit:
            return ""
        self.text += chunk
        cut = first_stop(self.text, self.stops, self.sent)  # a stop string cannot start in text already sent
        if cut >= 0:
            self.hit, self.text = True, self.text[:cut]
            end = cut
        elif final:
            end = len(self.text)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


class RowStreamer(BaseStreamer):
    """A streamer for a whole batch: row ``r`` belongs to ``owners[r] = (job, choice)``."""

    def __init__(self, tokenizer, stop_ids: set[int], owners: list[tuple[Job, int]], stop: threading.Event):
        self.tokenizer, self.stop_ids, self.owners, self.stop = tokenizer, stop_ids, owners, stop
        self.ids: list[list[int]] = [[] for _ in owners]
        self.texts = [IncrementalText(tokenizer) for _ in owners]
        self.decoded = [0] * len(owners)  # characters of each row's text decoded so far
        self.done = [False] * len(owners)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            for job in {id(j): j for j, _ in self.owners}.values():
                job.started_at = time.perf_counter()
                job.batch_rows = len(self.owners)
                job.emit("start", None)
            return
        now = time.perf_counter()
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids:
                self.done[row] = True
                continue
            job = self.owners[row][0]
            if job.first_token_at is None:
                job.first_token_at = now
            self.ids[row].append(token)
            self._emit(row, final=False)
        self._maybe_stop()

    def end(self) -> None:
        for row in range(len(self.owners)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        job, choice = self.owners[row]
        if job.cancelled.is_set():
            return
        chunk = self.texts[row].feed(self.ids[row], final)
        if chunk is None:
            return
        start, self.decoded[row] = self.decoded[row], self.decoded[row] + len(chunk)
        if self.decoded[row] > job.sent[choice]:  # a redo streams on from the text the client already has
            job.emit("delta", (choice, chunk[max(job.sent[choice] - start, 0):]))
            job.sent[choice] = self.decoded[row]

    def _maybe_stop(self) -> None:
        wanted = [not (done or job.cancelled.is_set() or job.finished[choice])
                  for done, (job, choice) in zip(self.done, self.owners)]
        if not any(wanted):
            self.stop.set()


class Batcher:
    """The bounded queue and its worker thread around ``engine``."""

    def __init__(self, engine, max_batch_size: int = 8, max_queue: int = 64, wait_s: float = 0.005):
        self.engine, self.max_batch_size, self.max_queue, self.wait_s = engine, max_batch_size, max_queue, wait_s
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.held: deque[Job] = deque()  # taken from the queue but not compatible with the last batch
        self.pending = 0
        self.lock = threading.Lock()
        self.generate_calls = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="vila-hd-serve-worker")
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``max_queue`` requests are already waiting."""
        with self.lock:
            if self.pending >= self.max_queue:
                raise QueueFull(f"the server queue is full ({self.max_queue} requests waiting, --max-queue)")
            self.pending += 1
            job.queued = True
        self.queue.put(job)

    def cancel(self, job: Job) -> None:
        """The client of ``job`` went away: a queued job gives its slot back now and is never run; a running
        one stops being streamed (its batch stops when no row is wanted)."""
        job.cancelled.set()
        self._dequeue(job)

    def _dequeue(self, job: Job) -> None:
        with self.lock:
            if job.queued:
                job.queued = False
                self.pending -= 1

    def close(self) -> None:
        self.closed.set()
        self.queue.put(None)
        self.thread.join(timeout=10)

    # --- worker ---------------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Job | None:
        """The oldest live job (held ones first); ``None`` on timeout or at :meth:`close`."""
        while True:
            if self.held:
                job = self.held.popleft()
            else:
                try:
                    job = self.queue.get(timeout=timeout) if timeout is not None else self.queue.get()
                except queue.Empty:
                    return None
            if job is None or not job.cancelled.is_set():
                return job

    def _take(self) -> list[Job] | None:
        first = self._next(None)
        if first is None:
            return None
        batch, rows, key = [first], first.rows, first.key()
        deadline = time.perf_counter() + self.wait_s
        skipped: list[Job] = []
        while rows < self.max_batch_size:
            job = self._next(max(deadline - time.perf_counter(), 0.0) or 0.0001)
            if job is None:
                break
            if job.key() == key and rows + job.rows <= self.max_batch_size:
                batch.append(job)
                rows += job.rows
            else:
                skipped.append(job)
        self.held.extendleft(reversed(skipped))
        return batch

    def _loop(self) -> None:
        while not self.closed.is_set():
            batch = self._take()
            if batch is None:
                return
            for job in batch:
                self._dequeue(job)
            live = [job for job in batch if not job.cancelled.is_set()]
            if live:
                self._answer(live)

    def _answer(self, batch: list[Job]) -> None:
        try:
            self._generate(batch)
        except Exception as err:  # noqa: BLE001 - handed to the requests; a batch is retried one by one
            if len(batch) == 1:
                batch[0].emit("error", err)
                return
            log.info("a batch of %d failed (%s); redoing each request alone", len(batch), type(err).__name__)
            for job in batch:
                if not job.cancelled.is_set():
                    self._answer([job])

    def _generate(self, batch: list[Job]) -> None:
        import torch

        engine = self.engine
        request = batch[0].request
        owners = [(job, i) for job in batch for i in range(job.rows)]
        stop = threading.Event()
        streamer = RowStreamer(engine.processor.tokenizer, engine.stop_token_ids, owners, stop)
        if request.sampling and request.seed is not None:
            torch.manual_seed(request.seed)
        self.generate_calls += 1
        conversations = [conv for job in batch for conv in job.conversations]
        results = engine.generate_batch(conversations, request.options, streamer=streamer, stop=stop)
        start = 0
        for job in batch:
            job.emit("done", results[start:start + job.rows])
            start += job.rows
