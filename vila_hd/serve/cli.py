"""``vila-hd serve``: load the model once and serve it over HTTP (see docs/serving.md)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
import time

from vila_hd.arguments import Command, non_negative_float, port_arg, positive_int
from vila_hd.errors import ConfigError, require_extra
from vila_hd.serve.arguments import add_generation_arguments, add_limit_arguments, add_model_arguments, load_engine

LOGGERS = ("vila_hd.serve", "uvicorn.error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_generation_arguments(parser)
    add_limit_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    group.add_argument("--port", type=port_arg, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    key = group.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: no key)")
    key.add_argument("--api-key-file", metavar="PATH", help="read the key from PATH (keeps it out of `ps`)")
    group.add_argument("--served-model-name", metavar="NAME", help="the model id clients see (default: the "
                       "--model folder's name)")
    group.add_argument("--max-batch-size", type=positive_int, default=8, metavar="N",
                       help="most rows answered in one generate (default: %(default)s)")
    group.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                       help="most requests waiting; more get 429 with Retry-After (default: %(default)s)")
    group.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0, metavar="MS",
                       help="how long the worker waits for batch-mates (default: %(default)s)")
    group.add_argument("--media-root", metavar="DIR", help="allow file:// and plain image paths under DIR")
    group.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    group.add_argument("--max-image-bytes", type=positive_int, default=20 * 2**20, metavar="N",
                       help="largest image file accepted (default: %(default)s)")
    group.add_argument("--log-json", action="store_true", help="log one JSON object per line")


def run(args: argparse.Namespace) -> int:
    """``vila-hd serve``: load the model, then serve until stopped."""
    require_extra("serve", "vila-hd serve", ["fastapi", "uvicorn"])
    import uvicorn

    from vila_hd.serve.app import ServeConfig, create_app
    from vila_hd.serve.schema import MediaPolicy

    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise ConfigError(f"--media-root {args.media_root!r} is not a directory")
    api_key = read_api_key(args)
    sock = bind(args.host, args.port)  # before loading the model: a busy port fails at once
    setup_logging(args.log_json)
    engine = load_engine(args, "vila-hd serve")
    if engine is None:
        sock.close()
        return 1
    config = ServeConfig(
        model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)) or args.model,
        model_aliases=model_aliases(args.model), api_key=api_key, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, batch_wait_s=args.batch_wait_ms / 1000,
        media=MediaPolicy(args.media_root, args.allow_remote_images, args.max_image_bytes),
    )
    host, port = sock.getsockname()[:2]
    if not api_key and not is_loopback(args.host):
        print(f"vila-hd serve: warning: listening on {host} without --api-key: anyone who can reach port {port} "
              "can use the model", file=sys.stderr)
    print(f"vila-hd serve: serving {config.model_name} on http://{_url_host(host)}:{port}", file=sys.stderr,
          flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="warning", log_config=None))
    server.run(sockets=[sock])
    return 0


SERVE = Command("serve", help="OpenAI-compatible HTTP server", add_arguments=add_arguments, run=run,
                description="OpenAI-compatible HTTP server for VILA-HD (POST /v1/chat/completions, GET /v1/models, "
                "GET /health); see docs/serving.md")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``vila-hd serve``."""
    return SERVE.parser()


def model_aliases(model: str) -> tuple[str, ...]:
    """The ids a request may name besides the served one: ``--model`` as given and its folder's name."""
    return tuple(a for a in dict.fromkeys([model, os.path.basename(os.path.normpath(model))]) if a)


def read_api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is None:
        if args.api_key == "":
            raise ConfigError("--api-key is empty")
        return args.api_key
    try:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as err:
        raise ConfigError(f"--api-key-file {args.api_key_file!r}: {err.strerror}") from None
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"--api-key-file {args.api_key_file!r} must hold one key (no spaces), got "
                          f"{'nothing' if not key else 'several words'}")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a refusal names the flags."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise ConfigError(f"--host {host!r}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} (--host / --port): {err.strerror or err}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level and the request's fields (or the message and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)), "level": record.levelname}
        request = getattr(record, "request", None)
        if request is not None:
            out.update(request)
        else:
            out["message"] = record.getMessage()
            if record.exc_info:
                out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(log_json: bool) -> None:
    """The server's own log (one line per request) and uvicorn's errors on stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_json else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


if __name__ == "__main__":
    from vila_hd.arguments import guarded

    sys.exit(guarded(SERVE.main))
