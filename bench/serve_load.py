"""Load test for ``vila-hd serve`` (loopback only): C concurrent streaming clients send R requests in all, then
stop; reports requests/s, p50/p99 time to first token and that every response completed.

    python bench/serve_load.py --model DIR [--clients 32] [--requests 128]   # starts a server in-process
    python bench/serve_load.py --url http://127.0.0.1:8000 [--api-key KEY]     # an already running one
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def one(url: str, headers: dict, i: int, max_tokens: int, timeout_s: float) -> tuple[float, bool]:
    start = time.perf_counter()
    first, done = None, False
    body = {"messages": [{"role": "user", "content": f"request {i}"}], "stream": True, "max_tokens": max_tokens}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout_s) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
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


def run_load(url: str, clients: int = 32, requests: int = 128, api_key: str | None = None, max_tokens: int = 16,
             timeout_s: float = 300) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ttfts, errors, lost = [], [], 0
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, url, headers, i, max_tokens, timeout_s) for i in range(requests)]
        for future in futures:
            try:
                ttft, done = future.result(timeout=timeout_s)
                ttfts.append(ttft)
                lost += not done
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(repr(err))
    elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"clients": clients, "requests": requests, "completed": len(ttfts) - lost, "errors": len(errors),
            "lost": lost, "requests_per_s": round(requests / elapsed, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 4) if ttfts else None,
            "first_errors": errors[:3]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--model", help="checkpoint to serve in-process on 127.0.0.1")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    server = None
    if args.url is None:
        import socket

        import uvicorn

        from vila_hd.engine import Engine
        from vila_hd.serve.app import ServeConfig, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(Engine.from_pretrained(args.model), ServeConfig(max_batch_size=args.max_batch_size,
                                                                         max_queue=max(64, args.clients)))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        args.url = f"http://127.0.0.1:{port}"
    report = run_load(args.url, args.clients, args.requests, args.api_key, args.max_tokens, args.timeout)
    if server is not None:
        report["generate_calls"] = app.state.batcher.generate_calls
        server.should_exit = True
    print(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 and report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
