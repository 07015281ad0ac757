"""Serve the app over HTTP with a graceful drain on SIGTERM (``python -m server`` calls these).

Granian runs the app through ``server.buffered.BufferedFront`` (its RSGI interface): headers within
``--header-timeout-s`` (granian), bodies read in asyncio within ``--body-timeout-s`` at ``--body-min-rate``
before a handler thread is taken, up to ``--max-connections`` sockets open at once (granian's
backpressure counts connections, idle keep-alive ones included); see docs/server.md, Slow clients.

On SIGTERM (or SIGINT) readiness answers 503 at once, the requests in flight and those queued
behind them are answered, and the process exits 0 once none has been in flight for a moment, or
after ``--drain-timeout`` seconds at the latest. A second signal stops at once.

Granian: the signal reaches the parent process, whose own handler would stop the worker process at
once (granian's worker, on its SIGTERM, closes its connections). ``DrainingGranian`` delays that:
the parent marks the shared ``DrainState`` as draining (the worker's ``FrontLayer`` then answers
readiness with 503), waits for the worker's requests in flight to end (those whose body is still
arriving or that wait for a thread included: a second ``DrainState``, counted by ``BufferedFront``),
then lets granian stop the worker. Send the signal to the main process only (systemd: ``KillMode=mixed``); a SIGTERM sent to
the worker process itself is granian's immediate stop.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import sys
import threading
from functools import partial

from .config import ServerConfig
from .front import DrainState
from .logs import setup_logging

log = logging.getLogger("server")


def one_torch_thread() -> None:
    """Requests are preprocessed in parallel threads; torch's own intra-op pool on top of that only
    oversubscribes the cores. (Torch-based model backends set their own count from --threads.)
    Also keeps freed memory for the next request (server.memory)."""
    import torch

    from .memory import keep_freed_memory
    torch.set_num_threads(1)
    keep_freed_memory()


def build_app(cfg: ServerConfig, a: argparse.Namespace, drain: DrainState | None = None):
    """Configure logging and threads, load the models, start the batching threads: the app. Raises
    ValueError/OSError for a bad bundle or flag (the caller prints it)."""
    from .app import create_app
    from .redis_front import redact_url

    one_torch_thread()
    setup_logging(a.log_level, a.log_format)
    logging.getLogger("werkzeug").setLevel(a.log_level)   # per-request lines only at INFO
    app = create_app(cfg, drain=drain)
    mode = f"redis {redact_url(cfg.redis_url)}" if cfg.redis_url else "embedded"
    names = ", ".join(m.name for m in app.extensions["inference"].models)
    auth = f", API keys: {len(cfg.api_keys)}" if cfg.api_keys else ""
    if cfg.trusted_keys:
        auth += f", bundle signatures {'required' if cfg.require_signature else 'checked'} " \
                f"({len(cfg.trusted_keys)} trusted key(s))"
    print(f"serving {names} ({mode}) on http://{cfg.host}:{cfg.port}{auth}", flush=True)
    return app


def validate_http_flags(a: argparse.Namespace) -> None:
    """The HTTP front's flags (ValueError naming the flag and the accepted range)."""
    from .config import check_range

    check_range("--http-threads", a.http_threads, 1)
    check_range("--header-timeout-s", a.header_timeout_s, 0.001, 60, "granian's limit")
    check_range("--body-timeout-s", a.body_timeout_s, 0.001, 86400)
    check_range("--body-min-rate", a.body_min_rate, 1)
    check_range("--max-connections", a.max_connections, 1)


def body_policy(cfg: ServerConfig, a: argparse.Namespace):
    from .buffered import BodyPolicy

    return BodyPolicy(timeout_s=a.body_timeout_s, min_rate=a.body_min_rate, max_request_bytes=cfg.max_request_bytes,
                      max_buffered_bytes=a.http_threads * cfg.max_request_bytes)


def raise_fd_limit(connections: int, reserve: int = 256) -> int:
    """Raise this process' soft limit on open files (``ulimit -n``, often 1024) towards the hard limit so
    that ``connections`` sockets plus ``reserve`` (model files, Redis, logs) fit. Returns how many
    connections fit; granian's backpressure is then set to that (a socket over the limit would be
    accepted and fail, where one over the backpressure waits in the listen backlog)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + reserve
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    fit = connections if soft == resource.RLIM_INFINITY else max(1, min(connections, soft - reserve))
    if fit < connections:
        log.warning("--max-connections %d lowered to %d: the open-file limit is %d (raise it: ulimit -n, "
                    "LimitNOFILE= in systemd, --ulimit nofile= in docker)", connections, fit, soft)
    return fit


def _granian_worker_app(cfg: ServerConfig, a: argparse.Namespace, failed, drain: DrainState,
                        pending: DrainState) -> object:
    """Runs in granian's worker process (forked: models and threads are created there, never
    before the fork). A load failure is printed, flagged for the parent and ends the worker."""
    import os

    from .buffered import BufferedFront
    try:
        app = build_app(cfg, a, drain)
        if a.http == "granian-wsgi":   # behind a proxy that buffers bodies: granian's threads read them
            return app
        return BufferedFront(app, body_policy(cfg, a), a.http_threads, pending)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        failed.value = 1
        os._exit(2)


class _QuietThreadCount(logging.Filter):
    """Granian warns when blocking threads exceed 2 x cores; ours mostly wait for their batch."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "Python threads" not in record.getMessage()


def _draining_server_class():
    from granian.server import Server

    class DrainingGranian(Server):
        """granian's server whose interrupt handler first drains (see the module docstring)."""

        def setup_drain(self, drain: DrainState, pending: DrainState, timeout_s: float) -> None:
            self.drain, self.pending, self.drain_timeout_s, self._drainer = drain, pending, timeout_s, None

        def signal_handler_interrupt(self, *args, **kwargs):
            if self._drainer is not None:   # a second signal: stop now
                return super().signal_handler_interrupt(*args, **kwargs)
            self.drain.start()
            self._drainer = threading.Thread(target=self._drain_then_stop, name="drain", daemon=True)
            self._drainer.start()

        def _drain_then_stop(self) -> None:
            import time

            end = time.monotonic() + self.drain_timeout_s   # pending covers in flight; both for clarity
            idle = self.pending.wait_idle(self.drain_timeout_s) and self.drain.wait_idle(max(0.0, end - time.monotonic()))
            if not idle:
                log.warning("drain: %d request(s) still in flight after --drain-timeout %.1fs; stopping",
                            max(self.drain.in_flight, self.pending.in_flight), self.drain_timeout_s)
            Server.signal_handler_interrupt(self)

    return DrainingGranian


def serve_granian(cfg: ServerConfig, a: argparse.Namespace) -> int:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings

    level = a.log_level.lower() if a.log_level.lower() in ("critical", "error", "warning", "info", "debug") else "info"
    drain, pending = DrainState(), DrainState()   # before the fork: shared with the worker process
    connections = raise_fd_limit(a.max_connections)
    wsgi = a.http == "granian-wsgi"
    srv = _draining_server_class()(
        "server.wsgi:app", address=cfg.host, port=cfg.port, interface=Interfaces.WSGI if wsgi else Interfaces.RSGI,
        workers=1,
        blocking_threads=a.http_threads if wsgi else 1,   # RSGI: the handler threads are BufferedFront's pool
        backpressure=connections, backlog=max(1024, min(connections, 65535)), http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=max(1, round(a.header_timeout_s * 1000))),
        websockets=False, log_level=level, respawn_failed_workers=False,
        workers_kill_timeout=5)   # the worker is idle by then: granian's own stop only closes connections
    srv.setup_drain(drain, pending, cfg.drain_timeout_s)
    logging.getLogger("_granian").addFilter(_QuietThreadCount())
    failed = multiprocessing.get_context("fork").Value("i", 0)
    try:
        srv.serve(target_loader=partial(_granian_worker_app, cfg, a, failed, drain, pending), wrap_loader=False)
    except SystemExit as exc:   # granian exits 1 when its worker died
        return 2 if failed.value else (exc.code if isinstance(exc.code, int) else 1)
    return 2 if failed.value else 0


def serve_werkzeug(cfg: ServerConfig, a: argparse.Namespace) -> int:
    """Werkzeug's threaded server in this process, with the same drain on SIGTERM/SIGINT."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    try:
        app = build_app(cfg, a)
    except (ValueError, OSError) as exc:   # ModelLoadError, bundle refusals, bad flags
        print(f"error: {exc}", file=sys.stderr)
        return 2
    drain: DrainState = app.extensions["drain"]

    class Handler(WSGIRequestHandler):
        timeout = a.body_timeout_s   # per socket read: a thread per connection, so only a stall is cut

    srv = make_server(cfg.host, cfg.port, app, threaded=True, request_handler=Handler)
    state = {"drainer": None}

    def drain_then_stop() -> None:
        if not drain.wait_idle(cfg.drain_timeout_s):
            log.warning("drain: %d request(s) still in flight after --drain-timeout %.1fs; stopping",
                        drain.in_flight, cfg.drain_timeout_s)
        srv.shutdown()

    def on_signal(signum, frame) -> None:
        if state["drainer"] is not None:
            raise SystemExit(1)   # a second signal: stop now
        drain.start()
        state["drainer"] = threading.Thread(target=drain_then_stop, name="drain", daemon=True)
        state["drainer"].start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0
