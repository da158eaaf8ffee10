"""Streaming an answer: text chunks as soon as they decode to whole characters (:class:`IncrementalText`,
the ``generate`` streamer :class:`_TextChunks`), the background thread that runs it (:class:`Generation`,
stoppable from any thread) and the per-token clock (:class:`_Clock`: the stop flag and the timings)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import torch
from transformers.generation import BaseStreamer, StoppingCriteria

from vila_hd.engine.results import GenerationResult


class IncrementalText:
    """The text of a growing token list, handed out as soon as it decodes to complete characters (a
    byte-level token may end inside a UTF-8 character). Each :meth:`feed` decodes only a short window: the
    tokens since the last text handed out plus the one before them (so that tokenizers which drop a leading
    space at the start of a decode still get it right)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._start = 0  # window start (one token before the first unsent one)
        self._sent = 0  # tokens whose text is out

    def feed(self, ids: list[int], final: bool = False) -> str | None:
        """The new text of ``ids`` (the whole list so far), or ``None`` while there is none that is whole."""
        done = self.tokenizer.decode(ids[self._start : self._sent], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[self._start :], skip_special_tokens=True)
        if len(text) > len(done) and (final or not text.endswith("\ufffd")):
            self._start, self._sent = self._sent, len(ids)
            return text[len(done) :]
        return None


class _TextChunks(BaseStreamer):
    """A streamer (``generate(streamer=...)``) that turns the new ids into text chunks on a queue.

    Unlike transformers' ``TextIteratorStreamer`` (which waits for whole words), it hands out text as soon
    as it decodes to complete characters (:class:`IncrementalText`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # SimpleQueue: its get() survives a KeyboardInterrupt in the reading thread without leaving a lock held
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ids: list[int] = []
        self._text = IncrementalText(tokenizer)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self._ids.extend(value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)
        self.queue.put(None)

    def _emit(self, final: bool) -> None:
        chunk = self._text.feed(self._ids, final)
        if chunk is not None:
            self.queue.put(chunk)


class _Clock(StoppingCriteria):
    """Stops generation when ``event`` is set, and records when each token was produced (a stopping
    criterion runs once per generated token) and when the LLM decoder ran (forward hooks)."""

    def __init__(self, event: threading.Event, decoder: torch.nn.Module, device: torch.device):
        self.event = event
        self.cuda = device.type == "cuda"
        self.token_times: list[float] = []
        self.calls: list[tuple[float, float]] = []
        self._start_call = 0.0
        self._handles = [decoder.register_forward_pre_hook(self._pre), decoder.register_forward_hook(self._post)]

    def _now(self) -> float:
        if self.cuda and not self.token_times:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        self._start_call = self._now()

    def _post(self, module, args, output):
        if not self.token_times:  # only the calls before the first token are needed
            self.calls.append((self._start_call, self._now()))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.token_times.append(self._now())
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class Generation:
    """A streamed answer: iterate for text chunks; :meth:`stop` (from any thread) ends it early.

    After the iteration, :attr:`result` holds the full :class:`GenerationResult`."""

    def __init__(self, run, chunks: _TextChunks, stop_event: threading.Event):
        self._chunks = chunks
        self._stop = stop_event
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._drained = False
        self.result: GenerationResult | None = None
        self.thread = threading.Thread(target=self._work, args=(run,), daemon=True, name="vila-hd-generate")
        self.thread.start()

    def _work(self, run) -> None:
        try:
            self.result = run()
        except BaseException as err:  # handed to the consumer's thread
            self._error = err
            self._chunks.queue.put(None)
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """Ask the generation to end after the current token."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def __iter__(self) -> Iterator[str]:
        while not self._drained:
            chunk = self._chunks.queue.get()
            if chunk is None:
                self._drained = True
                break
            yield chunk
        self.wait()

    def wait(self) -> GenerationResult:
        """Block until generation ends (stopping it is up to the caller); return the result."""
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self.result
