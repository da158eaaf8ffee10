"""Load test for ``vila-hd serve`` (loopback only): C concurrent streaming clients send R requests in all, then
stop; reports requests/s, p50/p99 time to first token (first text chunk) and that every response completed.

    python bench/serve_load.py --tiny [--clients 32] [--requests 128]   # the tiny random model, served in-process
    python bench/serve_load.py --model DIR [--device cuda]            # a checkpoint, served in-process
    python bench/serve_load.py --url http://127.0.0.1:8000 [--api-key KEY]   # a running server on this machine

A response is *completed* when it ends with ``data: [DONE]`` and no error event, an *error* when the status is
not 200 or an error event or exception came, *lost* when the stream ended without ``[DONE]``. The exit code is
0 only when every request completed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def one(url: str, headers: dict, i: int, max_tokens: int, timeout_s: float) -> tuple[float, bool]:
    """``(time to the first text chunk, whether [DONE] came)`` of one streamed request."""
    start = time.perf_counter()
    first, done = None, False
    body = {"messages": [{"role": "user", "content": f"request {i}"}], "stream": True, "max_tokens": max_tokens}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout_s) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), done


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def run_load(url: str, clients: int = 32, requests: int = 128, api_key: str | None = None, max_tokens: int = 16,
             timeout_s: float = 300) -> dict:
    """Send ``requests`` streamed requests from ``clients`` threads to a loopback ``url``; the figures."""
    if urlsplit(url).hostname not in LOOPBACK:
        raise SystemExit(f"serve_load.py: --url must be a loopback address ({sorted(LOOPBACK)}), got {url!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ttfts, errors, lost = [], [], 0
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, url, headers, i, max_tokens, timeout_s) for i in range(requests)]
        for future in futures:
            try:
                ttft, done = future.result(timeout=timeout_s)
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(repr(err))
                continue
            if done:
                ttfts.append(ttft)
            else:
                lost += 1
    elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"clients": clients, "requests": requests, "max_tokens": max_tokens, "completed": len(ttfts),
            "errors": len(errors), "lost": lost, "wall_s": round(elapsed, 2),
            "requests_per_s": round(len(ttfts) / elapsed, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_p99_s": round(percentile(ttfts, 99), 4) if ttfts else None, "first_errors": errors[:3]}


def serve_in_process(model: str, device: str | None, max_batch_size: int, clients: int, max_tokens: int):
    """``(url, stop, app, device)``: the app on a free loopback port in a uvicorn thread of this process."""
    import uvicorn

    from vila_hd.engine import Engine, GenerationOptions
    from vila_hd.serve.app import ServeConfig, create_app

    engine = Engine.from_pretrained(model, device=device,
                                    options=GenerationOptions(max_new_tokens=max_tokens, temperature=0))
    app = create_app(engine, ServeConfig(max_batch_size=max_batch_size, max_queue=max(64, clients)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{port}", stop, app, str(engine.input_device)


def tiny_checkpoint(folder: str) -> str:
    from vila_hd.builder import build_tiny_model

    model, processor = build_tiny_model("tiny", seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on this machine (loopback only)")
    where.add_argument("--model", help="checkpoint to serve in-process on 127.0.0.1")
    where.add_argument("--tiny", action="store_true", help="serve the tiny random-weight model in-process")
    parser.add_argument("--device", help="device of the in-process model (default: cuda if available, else cpu)")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    parser.add_argument("--output", metavar="JSON", help="also write the report to this file")
    args = parser.parse_args(argv)
    extra: dict = {"cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    with tempfile.TemporaryDirectory() as folder:
        stop = app = None
        if args.url is None:
            model = tiny_checkpoint(folder) if args.tiny else args.model
            args.url, stop, app, device = serve_in_process(model, args.device, args.max_batch_size, args.clients,
                                                           args.max_tokens)
            extra.update(model="tiny" if args.tiny else args.model, device=device, max_batch_size=args.max_batch_size)
        try:
            report = run_load(args.url, args.clients, args.requests, args.api_key, args.max_tokens, args.timeout)
        finally:
            if stop is not None:
                stop()
    if app is not None:
        report["generate_calls"] = app.state.batcher.generate_calls
    report = {**extra, **report}
    print(json.dumps(report, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["completed"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
