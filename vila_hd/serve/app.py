"""The FastAPI app: ``create_app(engine, config)`` (tests inject any engine with the Engine interface).

A chat request is read (bounded), validated (:func:`~vila_hd.serve.schema.parse_request`, in a worker thread:
images are decoded there), queued in the :class:`~vila_hd.serve.batcher.Batcher` and answered as JSON or as
server-sent events. Until the first event of its generation arrives, a request still gets a plain HTTP error
status (a prompt over the limit is a 413, not an event in a 200 stream). While it waits, and while it streams,
a client that goes away cancels its job. Every chat request writes one log line (:class:`RequestLog`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vila_hd.engine.options import LimitExceeded
from vila_hd.errors import is_user_error
from vila_hd.serve.batcher import Batcher, Job, QueueFull, StopText, first_stop
from vila_hd.serve.errors import APIError, error_body
from vila_hd.serve.schema import ChatRequest, MediaPolicy, parse_request

log = logging.getLogger("vila_hd.serve")
CLIENT_GONE = 499  # the log's status for a client that closed the connection before its answer ended


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings (``vila-hd serve`` flags of the same names)."""

    model_name: str = "vila-hd"
    model_aliases: tuple[str, ...] = ()  # other ids a request's "model" may give (the CLI: --model as given)
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.005
    media: MediaPolicy = MediaPolicy()
    max_body_bytes: int = 64 * 2**20


@dataclass
class RequestLog:
    """What the one log line of a chat request says (written by :meth:`write`, once)."""

    id: str
    start: float
    status: int = 200
    stream: bool = False
    n: int = 1
    usage: dict[str, Any] | None = None
    job: Job | None = None
    error: str | None = None
    written: bool = False

    def record(self) -> dict[str, Any]:
        job, usage = self.job, self.usage or {}
        ttft = job.first_token_at - self.start if job is not None and job.first_token_at is not None else None
        return {"id": self.id, "status": self.status, "stream": self.stream, "n": self.n,
                "prompt_tokens": usage.get("prompt_tokens"),
                "image_tokens": usage.get("prompt_tokens_details", {}).get("image_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "batch_rows": job.batch_rows if job is not None and job.batch_rows else None,
                "ttft_s": None if ttft is None else round(ttft, 4),
                "total_s": round(time.perf_counter() - self.start, 4), "error": self.error}

    def write(self) -> None:
        """Log the line (``key=value`` pairs; the fields as ``extra={"request": ...}`` for ``--log-json``)."""
        if self.written:
            return
        self.written = True
        record = self.record()
        log.info(" ".join(f"{k}={v}" for k, v in record.items()), extra={"request": record})


def create_app(engine, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    batcher = Batcher(engine, config.max_batch_size, config.max_queue, config.batch_wait_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="vila-hd serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher, app.state.engine, app.state.config = batcher, engine, config
    _add_error_handlers(app)
    check_key = _key_check(config.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queued": batcher.pending}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "vila-hd"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        entry = RequestLog(f"chatcmpl-{uuid.uuid4().hex[:24]}", time.perf_counter())
        try:
            check_key(request)
            return await _chat(request, entry, engine, batcher, config)
        except APIError as err:
            entry.status, entry.error = err.status, err.message
            entry.write()
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except Exception:  # a bug: the handler below answers 500; the request still gets its log line
            entry.status, entry.error = 500, "internal server error"
            entry.write()
            raise

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; a bug is a 500 with no detail (the traceback goes to the log)."""

    @app.exception_handler(APIError)
    async def refused(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body(500, "internal server error (see the server log)"), status_code=500)


def _key_check(api_key: str | None) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check_key(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)",
                           headers={"WWW-Authenticate": "Bearer"})

    return check_key


async def _read_json(request: Request, limit: int) -> Any:
    """The decoded body, read no further than ``limit`` bytes."""
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is over {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"the request body is over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON ({err})") from None


async def _chat(request: Request, entry: RequestLog, engine, batcher: Batcher, config: ServeConfig) -> Response:
    body = await _read_json(request, config.max_body_bytes)
    _check_model(body, config)
    image_token = getattr(engine.processor, "image_token", "<image>")
    req = await run_in_threadpool(parse_request, body, engine.options, engine.limits, config.media, image_token)
    entry.stream, entry.n = req.stream, req.n
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(req, _conversations(engine, req), lambda kind, x: loop.call_soon_threadsafe(events.put_nowait, (kind, x)))
    entry.job = job
    try:
        batcher.submit(job)
    except QueueFull as err:
        raise APIError(429, str(err), None, "queue_full", {"Retry-After": "1"}) from None
    meta = dict(id=entry.id, created=int(time.time()), model=config.model_name)
    if req.stream:
        first = await _unless_gone(request, batcher, job, _first_event(events))
        if first is None:
            return _gone(entry)
        stream = _stream(job, req, events, meta, entry, first)
        return EventStream(stream, on_close=lambda: _closed(batcher, job, entry))
    results = await _unless_gone(request, batcher, job, _collect(job, req, events))
    if results is None:
        return _gone(entry)
    reply = _completion(meta, req, results)
    entry.usage = reply["usage"]
    entry.write()
    return JSONResponse(reply)


def _check_model(body: Any, config: ServeConfig) -> None:
    """A request naming another model gets OpenAI's 404 ``model_not_found``; no ``model`` means the served one."""
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and model not in (config.model_name, *config.model_aliases):
        raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r} "
                       "(GET /v1/models)", "model", "model_not_found", type="invalid_request_error")


def _conversations(engine, req: ChatRequest) -> list[Any]:
    out = []
    for _ in range(req.n):
        conv = engine.conversation(req.system)
        conv.messages = [dict(m) for m in req.messages]
        conv.images = list(req.images)
        out.append(conv)
    return out


async def _unless_gone(request: Request, batcher: Batcher, job: Job, work: Awaitable[Any]) -> Any:
    """The result of ``work``; ``None`` (the job cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    batcher.cancel(job)
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _gone(entry: RequestLog) -> Response:
    entry.status, entry.error = CLIENT_GONE, "the client closed the connection"
    entry.write()
    return Response(status_code=CLIENT_GONE)


def _closed(batcher: Batcher, job: Job, entry: RequestLog) -> None:
    """A stream ended: normally, with an error event, or because its client went away (which frees its rows)."""
    batcher.cancel(job)
    if entry.usage is None and entry.error is None:
        entry.status, entry.error = CLIENT_GONE, "the client closed the connection"
    entry.write()


class EventStream(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (a client that went away included)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _first_event(events: asyncio.Queue) -> tuple[str, Any]:
    kind, payload = await events.get()
    if kind == "error":
        raise _as_api_error(payload)
    return kind, payload


def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, LimitExceeded):
        match = re.search(r"ServingLimits\.(\w+)", str(err))
        param = "max_tokens" if match and match.group(1) == "max_new_tokens" else "messages"
        return APIError(413 if param == "messages" else 400, str(err), param, "limit_exceeded")
    if is_user_error(err):
        return APIError(400, str(err).splitlines()[0] if str(err) else type(err).__name__)
    log.error("generation failed: %r", err, exc_info=err)
    return APIError(500, "internal server error (see the server log)")


async def _collect(job: Job, req: ChatRequest, events: asyncio.Queue) -> list[Any]:
    """The results of a non-streamed job (its stop strings end its rows early)."""
    stops = [StopText(req.stop) for _ in range(req.n)]
    while True:
        kind, payload = await events.get()
        if kind == "error":
            raise _as_api_error(payload)
        if kind == "done":
            return payload
        if kind == "delta":
            choice, text = payload
            stops[choice].feed(text)
            job.finished[choice] = stops[choice].hit


def _completion(meta: dict, req: ChatRequest, results: list) -> dict[str, Any]:
    choices = []
    for i, result in enumerate(results):
        text = _final_text(result.text, req.stop)
        choice = {"index": i, "message": {"role": "assistant", "content": text},
                  "finish_reason": _finish(result, req, text != result.text)}
        if req.return_selection:
            choice["selection"] = selection_maps(result)
        choices.append(choice)
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(results)}


async def _stream(job: Job, req: ChatRequest, events: asyncio.Queue, meta: dict, entry: RequestLog,
                  first: tuple[str, Any]) -> AsyncIterator[str]:
    """OpenAI's chunks: each choice's role, its text as it comes (stop strings held back and cut), each
    choice's finish reason, the usage (``stream_options.include_usage``), then ``[DONE]``."""
    stops = [StopText(req.stop) for _ in range(req.n)]
    for i in range(req.n):
        yield _sse(meta, [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    kind, payload = first
    while kind not in ("done", "error"):
        if kind == "delta":  # ("start" comes again when a failed batch is redone: nothing to send)
            choice, text = payload
            out = stops[choice].feed(text)
            job.finished[choice] = stops[choice].hit
            if out:
                yield _sse(meta, [{"index": choice, "delta": {"content": out}, "finish_reason": None}])
        kind, payload = await events.get()
    if kind == "error":
        err = _as_api_error(payload)
        entry.status, entry.error = err.status, err.message
        yield f"data: {json.dumps(err.body())}\n\n"
    else:
        for chunk in _final_chunks(meta, req, payload, stops, entry):
            yield chunk
    yield "data: [DONE]\n\n"


def _final_chunks(meta: dict, req: ChatRequest, results: list, stops: list[StopText], entry: RequestLog):
    for i, result in enumerate(results):
        tail = stops[i].feed("", final=True)
        choice = {"index": i, "delta": {"content": tail} if tail else {},
                  "finish_reason": _finish(result, req, stops[i].hit)}
        if req.return_selection:
            choice["selection"] = selection_maps(result)
        yield _sse(meta, [choice])
    entry.usage = _usage(results)
    if req.include_usage:
        yield _sse(meta, [], entry.usage)


def _sse(meta: dict, choices: list, usage: dict | None = None) -> str:
    chunk = {**meta, "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"


def _final_text(text: str, stops: list[str]) -> str:
    cut = first_stop(text, stops)
    return text if cut < 0 else text[:cut]


def _finish(result, req: ChatRequest, stopped_by_string: bool) -> str:
    """``stop`` at end of turn or a stop string; ``length`` when the answer ran into max_tokens."""
    if stopped_by_string:
        return "stop"
    hit_eos = result.stats.new_tokens > len(result.token_ids)
    return "length" if not hit_eos and result.stats.new_tokens >= req.options.max_new_tokens else "stop"


def _usage(results: list) -> dict[str, Any]:
    first = results[0].stats
    completion = sum(r.stats.new_tokens for r in results)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"image_tokens": first.image_tokens, "cached_tokens": 0}}


def selection_maps(result) -> list[list[dict[str, Any]]]:
    """Per image, per high-res scale: the selected-patch grid (0/1 rows), its shape and its count."""
    if result.selection_maps is None or not result.images:
        return []
    out = []
    for i in range(len(result.images)):
        scales = []
        for maps in result.selection_maps:
            grid = maps[i].int().cpu().tolist()
            scales.append({"shape": list(maps[i].shape), "selected": int(sum(map(sum, grid))), "grid": grid})
        out.append(scales)
    return out
