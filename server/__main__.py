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
import logging
import multiprocessing
import shlex
import sys
from functools import partial

from .config import ServerConfig, add_common_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="Image classification HTTP service")
    add_common_arguments(p)
    p.add_argument("--redis-url", default=None, help="use Redis Streams workers (default: embedded mode)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=256, help="queued jobs per model before 503")
    p.add_argument("--runners", type=int, default=1,
                   help="embedded mode: batches in flight at once per model (onnxruntime backends; others "
                        "run one batch at a time). mobilenet_v3_large on 2 cores: --runners 2 --threads 1 "
                        "served 1.1-1.3x the requests/s of --threads 2 at concurrency 16; a lone request then "
                        "runs on an extra session with every core (see --solo-threads)")
    p.add_argument("--solo-threads", type=int, default=None,
                   help="embedded mode with --runners > 1: intra-op threads of an extra session that runs a "
                        "batch when no other batch runs and no request is arriving (default: runners x "
                        "threads, at most the cores; 0: no extra session, which saves a copy of the weights)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="request deadline (504 after it)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="per image; larger ones get 413")
    p.add_argument("--max-images", type=int, default=64, help="images per request")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode JPEGs at a reduced DCT scale (faster for large photos, not bit-exact)")
    p.add_argument("--http", choices=("granian", "werkzeug"), default="granian",
                   help="HTTP server: granian (default; Rust HTTP, the app in one worker process) or werkzeug "
                        "(pure Python, in this process)")
    p.add_argument("--http-threads", type=int, default=64,
                   help="granian: Python threads handling requests at once (each waits for its batch); "
                        "further requests wait in granian's queue")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    a = build_parser().parse_args(argv)
    cfg = ServerConfig(bundles=a.bundles, redis_url=a.redis_url, host=a.host, port=a.port, backend=a.backend,
                       threads=a.threads, runners=a.runners, solo_threads=a.solo_threads, max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue,
                       timeout_s=a.timeout_s, max_request_bytes=a.max_request_bytes, max_pixels=a.max_pixels,
                       max_images=a.max_images, jpeg_draft=a.jpeg_draft, prefix=a.prefix, reply_ttl_s=a.reply_ttl_s)
    return cfg, a


def _one_torch_thread() -> None:
    """Requests are preprocessed in parallel threads; torch's own intra-op pool on top of that only
    oversubscribes the cores. (Torch-based model backends set their own count from --threads.)
    Also keeps freed memory for the next request (server.memory)."""
    import torch

    from .memory import keep_freed_memory
    torch.set_num_threads(1)
    keep_freed_memory()


def _build_app(cfg: ServerConfig, a: argparse.Namespace):
    """Configure logging and threads, load the models, start the batching threads: the app. Raises
    ValueError/OSError for a bad bundle or flag (the caller prints it)."""
    from .app import create_app

    _one_torch_thread()
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(a.log_level)   # per-request lines only at INFO
    app = create_app(cfg)
    mode = f"redis {cfg.redis_url}" if cfg.redis_url else "embedded"
    names = ", ".join(m.name for m in app.extensions["inference"].models)
    print(f"serving {names} ({mode}) on http://{cfg.host}:{cfg.port}", flush=True)
    return app


def _granian_worker_app(cfg: ServerConfig, a: argparse.Namespace, failed) -> object:
    """Runs in granian's worker process (forked: models and threads are created there, never
    before the fork). A load failure is printed, flagged for the parent and ends the worker."""
    import os
    try:
        return _build_app(cfg, a)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        failed.value = 1
        os._exit(2)


class _QuietThreadCount(logging.Filter):
    """Granian warns when blocking threads exceed 2 x cores; ours mostly wait for their batch."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "Python threads" not in record.getMessage()


def _serve_granian(cfg: ServerConfig, a: argparse.Namespace) -> int:
    from granian.constants import HTTPModes, Interfaces
    from granian.server import Server

    level = a.log_level.lower() if a.log_level.lower() in ("critical", "error", "warning", "info", "debug") else "info"
    srv = Server("server.wsgi:app", address=cfg.host, port=cfg.port, interface=Interfaces.WSGI, workers=1,
                 blocking_threads=a.http_threads, backpressure=a.http_threads, http=HTTPModes.http1,
                 websockets=False, log_level=level, respawn_failed_workers=False)
    logging.getLogger("_granian").addFilter(_QuietThreadCount())
    failed = multiprocessing.get_context("fork").Value("i", 0)
    try:
        srv.serve(target_loader=partial(_granian_worker_app, cfg, a, failed), wrap_loader=False)
    except SystemExit as exc:   # granian exits 1 when its worker died
        return 2 if failed.value else (exc.code if isinstance(exc.code, int) else 1)
    return 2 if failed.value else 0


def main(argv: list[str] | None = None) -> int:
    from export.manifest import read_manifest   # here, not at import: server.wsgi imports this module

    cfg, a = config_from_args(argv)
    try:
        cfg.validate()
        if a.http_threads < 1:
            raise ValueError(f"--http-threads must be >= 1, got {a.http_threads}")
        for bundle in cfg.bundles:   # fail fast, in this process, on a missing or unreadable bundle
            read_manifest(bundle)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.http == "granian":
        return _serve_granian(cfg, a)
    try:
        app = _build_app(cfg, a)
    except (ValueError, OSError) as exc:   # ModelLoadError, bundle refusals, bad flags
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app.run(host=cfg.host, port=cfg.port, debug=False, threaded=True, use_reloader=False)
    return 0


def app_from_env_args(args: str) -> "object":
    from .app import create_app
    cfg, _ = config_from_args(shlex.split(args))
    _one_torch_thread()
    return create_app(cfg.validate())


if __name__ == "__main__":
    sys.exit(main())
