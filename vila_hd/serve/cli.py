"""``vila-hd serve``: load the model once and serve it over HTTP (see docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

INSTALL_HINT = "vila-hd serve: error: the server needs FastAPI and uvicorn: pip install 'vila-hd[serve]'"


def build_parser() -> argparse.ArgumentParser:
    from vila_hd.cli import add_generation_arguments, add_limit_arguments, add_model_arguments, positive_int

    parser = argparse.ArgumentParser(prog="vila-hd serve", description="OpenAI-compatible HTTP server for VILA-HD")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    add_limit_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    group.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    group.add_argument("--api-key", default=os.environ.get("VILA_HD_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $VILA_HD_API_KEY; none: open)")
    group.add_argument("--served-model-name", help="the model id clients see (default: the --model name)")
    group.add_argument("--max-batch-size", type=positive_int, default=8, metavar="N",
                       help="most rows answered in one generate (default: %(default)s)")
    group.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                       help="most requests waiting; more get 429 with Retry-After (default: %(default)s)")
    group.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                       help="how long the worker waits for batch-mates (default: %(default)s)")
    group.add_argument("--media-root", metavar="DIR", help="allow file:// and plain image paths under DIR")
    group.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    group.add_argument("--max-image-bytes", type=positive_int, default=20 * 2**20, metavar="N",
                       help="largest image file accepted (default: %(default)s)")
    group.add_argument("--log-json", action="store_true", help="one JSON object per request log line")
    return parser


def serve_main(argv: Sequence[str] | None = None) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    from vila_hd.cli import load_engine
    from vila_hd.serve.app import ServeConfig, create_app
    from vila_hd.serve.schema import MediaPolicy

    args = build_parser().parse_args(argv)
    if args.media_root is not None and not os.path.isdir(args.media_root):
        print(f"vila-hd serve: error: --media-root {args.media_root!r} is not a directory", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s" if args.log_json else "%(asctime)s %(message)s")
    engine = load_engine(args, "vila-hd serve")
    if engine is None:
        return 1
    config = ServeConfig(
        model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)) or args.model,
        api_key=args.api_key, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
        batch_wait_s=args.batch_wait_ms / 1000,
        media=MediaPolicy(args.media_root, args.allow_remote_images, args.max_image_bytes), log_json=args.log_json,
    )
    print(f"vila-hd serve: serving {config.model_name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level="warning")
    return 0
