"""HTTP front (embedded mode unless --redis-url is given).

    python -m server --bundle bundles/digits [--bundle DIR2 ...] [--redis-url URL] [--host 127.0.0.1 --port 8000]

HTTP is served by Granian (Rust HTTP/1.1 parsing, the Flask app on a pool of Python threads in one
worker process that also holds the models and the batching threads): about 0.2 ms of CPU per request
against 0.9 ms for Werkzeug's threaded server, which ``--http werkzeug`` still selects (never debug
mode). gunicorn runs the same app too:
    SERVER_ARGS="--bundle bundles/digits --redis-url URL" gunicorn -w 4 -k gthread --threads 16 'server.wsgi:app'
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .config import ServerConfig, add_common_arguments, check_range
from .front import parse_api_keys
from .logs import add_logging_arguments

API_KEY_ENV = "SERVER_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="Image classification HTTP service")
    add_common_arguments(p)
    p.add_argument("--redis-url", default=None, help="use Redis Streams workers (default: embedded mode)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=256, help="queued jobs per model before 503")
    p.set_defaults(max_batch=None)   # chosen per model at start-up (server.layout), unlike the worker's 32
    p.add_argument("--runners", type=int, default=None,
                   help="embedded mode: batches in flight at once per model (onnxruntime backends; others run "
                        "one batch at a time). Default: chosen at start-up from the cores and a ~1-2 s measurement "
                        "of the model (one single-thread runner per core, or one runner with every core); "
                        "GET /models shows the choice and why")
    p.add_argument("--solo-threads", type=int, default=None,
                   help="embedded mode with several runners: intra-op threads of an extra session that runs a "
                        "batch when no other batch runs and no request is arriving (default: runners x "
                        "threads, at most the cores, if that makes batch 1 faster; 0: no extra session, which "
                        "saves a copy of the weights)")
    p.add_argument("--max-queue-rows", type=int, default=1024,
                   help="model rows (images x TTA views) queued or running per model before 503 + Retry-After; "
                        "one request over it gets 413")
    p.add_argument("--timeout-s", type=float, default=10.0,
                   help="request deadline from its arrival, decoding included (504 after it)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="per image; larger ones get 413")
    p.add_argument("--max-images", type=int, default=64, help="images per request")
    p.add_argument("--max-tta-views", type=int, default=16,
                   help="views per image of a TTA policy the client chooses (ten-crop: 10); more get 422")
    p.add_argument("--max-tta-scale", type=float, default=2.0,
                   help="largest TTA resize (multiscale:S) relative to the bundle's resize size; larger get 422")
    p.add_argument("--max-request-pixels", type=int, default=100_000_000,
                   help="per request, from the image headers before decoding: decoded pixels plus the pixels "
                        "of every resize the TTA views need; more get 413")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode JPEGs at a reduced DCT scale (faster for large photos, not bit-exact)")
    p.add_argument("--http", choices=("granian", "werkzeug"), default="granian",
                   help="HTTP server: granian (default; Rust HTTP, the app in one worker process) or werkzeug "
                        "(pure Python, in this process)")
    p.add_argument("--http-threads", type=int, default=64,
                   help="granian: Python threads handling requests at once (each waits for its batch); "
                        "further requests wait in granian's queue")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM: readiness answers 503 at once, requests in flight and queued are answered, "
                        "then the process exits 0, after S seconds at the latest (a second signal stops at once)")
    p.add_argument("--api-key", dest="api_keys", action="append", default=[], metavar="KEY[,KEY2]",
                   help="require this API key ('Authorization: Bearer KEY' or 'X-API-Key: KEY') on every route "
                        "but health and readiness; repeat or comma-separate for rotation. Prefer the SERVER_API_KEY "
                        "environment variable (same syntax), which keeps keys out of `ps`")
    add_logging_arguments(p)
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    a = build_parser().parse_args(argv)
    cfg = ServerConfig(bundles=a.bundles, redis_url=a.redis_url, host=a.host, port=a.port, backend=a.backend,
                       precision=a.precision,
                       threads=a.threads, runners=a.runners, solo_threads=a.solo_threads, max_batch=a.max_batch, device=a.device, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue,
                       timeout_s=a.timeout_s, max_request_bytes=a.max_request_bytes, max_pixels=a.max_pixels,
                       max_images=a.max_images, jpeg_draft=a.jpeg_draft, prefix=a.prefix, reply_ttl_s=a.reply_ttl_s,
                       max_tta_views=a.max_tta_views, max_tta_scale=a.max_tta_scale,
                       max_request_pixels=a.max_request_pixels, max_queue_rows=a.max_queue_rows,
                       drain_timeout_s=a.drain_timeout, trusted_keys=tuple(a.trusted_keys),
                       require_signature=a.require_signature,
                       api_keys=parse_api_keys(a.api_keys, os.environ.get(API_KEY_ENV)))
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    from .models import read_trusted_manifest   # here, not at import: server.wsgi imports this module

    try:
        cfg, a = config_from_args(argv)
        cfg.validate()
        check_range("--http-threads", a.http_threads, 1)
        for bundle in cfg.bundles:   # fail fast, in this process, on a missing, unreadable or unsigned bundle
            read_trusted_manifest(bundle, cfg.trusted_keys, cfg.require_signature)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .serving import serve_granian, serve_werkzeug
    return serve_granian(cfg, a) if a.http == "granian" else serve_werkzeug(cfg, a)


def app_from_env_args(args: str) -> "object":
    """gunicorn's app (server.wsgi): SERVER_ARGS parsed as the command line, logging as its flags say."""
    from .app import create_app
    from .logs import setup_logging
    from .serving import one_torch_thread
    cfg, a = config_from_args(shlex.split(args))
    one_torch_thread()
    setup_logging(a.log_level, a.log_format)
    return create_app(cfg.validate())


if __name__ == "__main__":
    sys.exit(main())
