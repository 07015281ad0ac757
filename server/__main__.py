"""HTTP front (embedded mode unless --redis-url is given).

    python -m server --bundle bundles/digits [--bundle DIR2 ...] [--redis-url URL] [--host 127.0.0.1 --port 8000]

This runs Werkzeug's threaded server (never debug mode). For production run the same app under
gunicorn:  SERVER_ARGS="--bundle bundles/digits --redis-url URL" gunicorn -w 4 -k gthread --threads 16 'server.wsgi:app'
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

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
                        "served 1.23x the requests/s of --threads 2 at concurrency 16; resnet50 about the "
                        "same. --threads 2 gives the lowest latency for a lone request")
    p.add_argument("--timeout-s", type=float, default=10.0, help="request deadline (504 after it)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="per image; larger ones get 413")
    p.add_argument("--max-images", type=int, default=64, help="images per request")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode JPEGs at a reduced DCT scale (faster for large photos, not bit-exact)")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    a = build_parser().parse_args(argv)
    cfg = ServerConfig(bundles=a.bundles, redis_url=a.redis_url, host=a.host, port=a.port, backend=a.backend,
                       threads=a.threads, runners=a.runners, max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue,
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


def main(argv: list[str] | None = None) -> int:
    from .app import create_app

    cfg, a = config_from_args(argv)
    _one_torch_thread()
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(a.log_level)   # per-request lines only at INFO
    try:
        app = create_app(cfg.validate())
    except (ValueError, OSError) as exc:   # ModelLoadError, bundle refusals, bad flags
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = f"redis {cfg.redis_url}" if cfg.redis_url else "embedded"
    names = ", ".join(m.name for m in app.extensions["inference"].models)
    print(f"serving {names} ({mode}) on http://{cfg.host}:{cfg.port}", flush=True)
    app.run(host=cfg.host, port=cfg.port, debug=False, threaded=True, use_reloader=False)
    return 0


def app_from_env_args(args: str) -> "object":
    from .app import create_app
    cfg, _ = config_from_args(shlex.split(args))
    _one_torch_thread()
    return create_app(cfg.validate())


if __name__ == "__main__":
    sys.exit(main())
