"""The FastAPI app: ``create_app(engine, config)`` (tests inject any engine with the Engine interface)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vila_hd.engine import LimitExceeded
from vila_hd.errors import is_user_error
from vila_hd.serve.batcher import Batcher, Job, QueueFull, StopText
from vila_hd.serve.errors import APIError, error_body
from vila_hd.serve.schema import ChatRequest, MediaPolicy, parse_request

log = logging.getLogger("vila_hd.serve")


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "vila-hd"
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.005
    media: MediaPolicy = MediaPolicy()
    max_body_bytes: int = 64 * 2**20
    log_json: bool = False


def create_app(engine, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    app = FastAPI(title="vila-hd serve", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = Batcher(engine, config.max_batch_size, config.max_queue, config.batch_wait_s)
    app.state.batcher, app.state.engine, app.state.config = batcher, engine, config

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error (see the server log)"), status_code=500)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return JSONResponse(error_body(401, "missing or wrong API key (Authorization: Bearer KEY)"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queued": batcher.pending}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "vila-hd"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            return await _chat(request, rid, engine, batcher, config)
        except APIError as err:
            _log(config, rid, err.status, None, None, None, None)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    return app


async def _body(request: Request, config: ServeConfig) -> Any:
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > config.max_body_bytes:
        raise APIError(413, f"the request body is over {config.max_body_bytes} bytes")
    raw = await request.body()
    if len(raw) > config.max_body_bytes:
        raise APIError(413, f"the request body is over {config.max_body_bytes} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None


def _conversations(engine, req: ChatRequest) -> list[Any]:
    out = []
    for _ in range(req.n):
        conv = engine.conversation(req.system)
        conv.messages = [dict(m) for m in req.messages]
        conv.images = list(req.images)
        out.append(conv)
    return out


def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, LimitExceeded):
        match = re.search(r"ServingLimits\.(\w+)", str(err))
        param = "max_tokens" if match and match.group(1) == "max_new_tokens" else "messages"
        return APIError(413 if param == "messages" else 400, str(err), param, "limit_exceeded")
    if is_user_error(err):
        return APIError(400, str(err).splitlines()[0] if str(err) else type(err).__name__)
    log.error("generation failed: %r", err)
    return APIError(500, "internal server error (see the server log)")


async def _chat(request: Request, rid: str, engine, batcher: Batcher, config: ServeConfig):
    start = time.perf_counter()
    body = await _body(request, config)
    image_token = getattr(engine.processor, "image_token", "<image>")
    req = await run_in_threadpool(parse_request, body, engine.options, engine.limits, config.media, image_token)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(req, _conversations(engine, req), lambda kind, x: loop.call_soon_threadsafe(events.put_nowait, (kind, x)))
    try:
        batcher.submit(job)
    except QueueFull as err:
        raise APIError(429, str(err), None, "queue_full", {"Retry-After": "1"}) from None
    try:
        kind, payload = await events.get()
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    if kind == "error":
        raise _as_api_error(payload)
    meta = dict(id=rid, created=int(time.time()), model=config.model_name)
    if req.stream:
        return StreamingResponse(_stream(job, req, events, meta, config, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(job, req, events, meta, config, start, kind, payload)


async def _complete(job, req, events, meta, config, start, kind, payload):
    stops = [StopText(req.stop) for _ in range(req.n)]
    while kind != "done":
        if kind == "error":
            raise _as_api_error(payload)
        if kind == "delta":
            choice, text = payload
            stops[choice].feed(text)
            if stops[choice].hit:
                job.finished[choice] = True
        kind, payload = await events.get()
    results = payload
    choices = []
    for i, result in enumerate(results):
        text = _final_text(result.text, req.stop)
        choice = {"index": i, "message": {"role": "assistant", "content": text},
                  "finish_reason": _finish(result, req, text)}
        if req.return_selection:
            choice["selection"] = selection_maps(result)
        choices.append(choice)
    usage = _usage(results)
    _log(config, meta["id"], 200, usage, job, start, time.perf_counter())
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}


async def _stream(job, req, events, meta, config, start):
    stops = [StopText(req.stop) for _ in range(req.n)]
    status = 200
    try:
        for i in range(req.n):
            yield _sse(meta, [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                choice, text = payload
                out = stops[choice].feed(text)
                if stops[choice].hit:
                    job.finished[choice] = True
                if out:
                    yield _sse(meta, [{"index": choice, "delta": {"content": out}, "finish_reason": None}])
            elif kind == "error":
                status = _as_api_error(payload).status
                yield f"data: {json.dumps(_as_api_error(payload).body())}\n\n"
                break
            else:
                for i, result in enumerate(payload):
                    tail = stops[i].feed("", final=True)
                    delta = {"content": tail} if tail else {}
                    choice = {"index": i, "delta": delta,
                              "finish_reason": "stop" if stops[i].hit else _finish(result, req, result.text)}
                    if req.return_selection:
                        choice["selection"] = selection_maps(result)
                    yield _sse(meta, [choice])
                usage = _usage(payload)
                if req.include_usage:
                    yield _sse(meta, [], usage)
                _log(config, meta["id"], status, usage, job, start, time.perf_counter())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away frees its rows (the batch stops when none is wanted)


def _sse(meta: dict, choices: list, usage: dict | None = None) -> str:
    chunk = {**meta, "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"


def _final_text(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _finish(result, req: ChatRequest, text: str) -> str:
    if text != result.text:
        return "stop"
    stats = result.stats
    hit_eos = stats.new_tokens > len(result.token_ids)
    return "length" if not hit_eos and stats.new_tokens >= req.options.max_new_tokens else "stop"


def _usage(results: list) -> dict[str, Any]:
    first = results[0].stats
    completion = sum(r.stats.new_tokens for r in results)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"image_tokens": first.image_tokens, "cached_tokens": 0}}


def selection_maps(result) -> list[list[dict[str, Any]]]:
    """Per image, per high-res scale: the selected-patch grid (0/1 rows) and its count."""
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


def _log(config: ServeConfig, rid: str, status: int, usage, job, start, end) -> None:
    ttft = None if job is None or job.started_at is None or start is None else job.started_at - start
    record = {"id": rid, "status": status,
              "prompt_tokens": usage["prompt_tokens"] if usage else None,
              "completion_tokens": usage["completion_tokens"] if usage else None,
              "ttft_s": round(ttft, 4) if ttft is not None else None,
              "total_s": round(end - start, 4) if end is not None and start is not None else None}
    if config.log_json:
        log.info(json.dumps(record))
    else:
        log.info(" ".join(f"{k}={v}" for k, v in record.items()))
