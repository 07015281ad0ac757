"""Inference workers for Redis mode: batch jobs from one stream per model through a consumer group.

    python -m server.worker --redis-url redis://127.0.0.1:6379/0 --bundle bundles/digits [--bundle ...]

Run any number of them, on any machine. Each reads the stream of its bundle (keys named by the
bundle checksum: a worker holding another bundle of the model neither takes these jobs nor counts
as live for its fronts) with XREADGROUP, gathers up to --max-batch rows or until --max-delay-ms
passes, runs one batched inference, then writes each reply and XACKs it in one Lua script (so a job
is answered once even if two workers end up holding it). While a batch runs, a keeper thread
refreshes its entries (XCLAIM ... JUSTID) and the heartbeat, so a long batch is neither reclaimed
nor taken for a dead worker. Entries a dead worker left pending are reclaimed with XAUTOCLAIM after
--claim-idle-ms; one delivered more than --max-deliveries times goes to the dead-letter stream and
its client gets an error. Jobs whose deadline has passed (on Redis' clock) are acknowledged without
being computed; a job naming another bundle (written by hand into this stream) is answered 409.
SIGTERM drains: the batch in hand is answered and acknowledged, the consumer leaves the group, and
the process exits 0 within --drain-timeout.
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time

from .config import WorkerConfig, add_common_arguments
from .logs import add_logging_arguments, setup_logging
from .metrics import ServerMetrics
from .models import load_served_model
from .redis_front import check_url, redact_url
from .redis_worker import MIN_CLAIM_IDLE_MS, ModelWorker

log = logging.getLogger("server.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", required=True, help="e.g. redis://127.0.0.1:6379/0")
    add_common_arguments(p)
    p.add_argument("--claim-idle-ms", type=int, default=5000,
                   help=f"reclaim jobs pending this long (>= {MIN_CLAIM_IDLE_MS}; a running batch's entries are "
                        "refreshed every third of it, so only a dead or stalled worker's are taken)")
    p.add_argument("--max-deliveries", type=int, default=3, help="then dead-letter the job")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to finish and acknowledge the batch in hand before exiting 0")
    p.add_argument("--consumer", default=None, help="consumer name (default host-pid)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve this worker's /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address --metrics-port listens on (0.0.0.0: reachable by a scraper on another machine)")
    add_logging_arguments(p)
    return p


def check_worker_args(a: argparse.Namespace) -> None:
    """Refuse a worker flag that could only misbehave (a batch of 0 rows, replies that expire at
    once, reclaiming running batches...), naming the flag and what it accepts. Raises ValueError."""
    if not a.bundles:
        raise ValueError("pass --bundle DIR (a bundle written by `python -m export`)")
    for flag, v, low, what in (("--max-batch", a.max_batch, 1, "model rows per batched call"),
                               ("--threads", a.threads, 1, "intra-op threads per model"),
                               ("--max-deliveries", a.max_deliveries, 1, "deliveries before a job is dead-lettered"),
                               ("--reply-ttl-s", a.reply_ttl_s, 1, "seconds an unread reply stays in Redis"),
                               ("--claim-idle-ms", a.claim_idle_ms, MIN_CLAIM_IDLE_MS,
                                "ms a pending entry must be idle before another worker reclaims it")):
        if v is not None and v < low:
            raise ValueError(f"{flag} must be >= {low} ({what}), got {v}")
    for flag, v, what in (("--max-delay-ms", a.max_delay_ms, "longest wait for a batch to fill"),
                          ("--drain-timeout", a.drain_timeout, "seconds to finish the batch in hand on SIGTERM")):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{flag} must be a finite number >= 0 ({what}), got {v}")
    if a.metrics_port is not None and not 1 <= a.metrics_port <= 65535:
        raise ValueError(f"--metrics-port must be a TCP port 1-65535 (leave it out for no /metrics), got {a.metrics_port}")
    for flag, v in (("--prefix", a.prefix), ("--consumer", a.consumer), ("--metrics-host", a.metrics_host)):
        if v is not None and (not v.strip() or v != v.strip()):
            raise ValueError(f"{flag} must be a non-empty name without surrounding spaces, got {v!r}")
    check_url(a.redis_url)


def main(argv: list[str] | None = None) -> int:
    from .memory import keep_freed_memory

    keep_freed_memory()
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        check_worker_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = WorkerConfig(redis_url=args.redis_url, bundles=args.bundles, backend=args.backend,
                       precision=args.precision, threads=args.threads,
                       max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, claim_idle_ms=args.claim_idle_ms,
                       max_deliveries=args.max_deliveries, prefix=args.prefix, reply_ttl_s=args.reply_ttl_s,
                       metrics_port=args.metrics_port, metrics_host=args.metrics_host, device=args.device,
                       trusted_keys=tuple(args.trusted_keys), require_signature=args.require_signature)
    if args.consumer:
        cfg.consumer = args.consumer
    cfg.drain_timeout_s = args.drain_timeout
    try:
        check_url(cfg.redis_url)
        trust = (cfg.trusted_keys, cfg.require_signature)
        models = [load_served_model(b, cfg.backend, cfg.threads, device=cfg.device, trust=trust,
                                    precision=cfg.precision) for b in cfg.bundles]
    except (ValueError, OSError) as exc:   # bundle refusals name the file and the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = ServerMetrics("worker")
    for m in models:
        metrics.model_info(m.name, version=m.version, **m.execution())
    if cfg.metrics_port:
        from prometheus_client import start_http_server
        try:
            start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=metrics.registry)
        except OSError as exc:   # port taken, address not on this machine
            print(f"error: --metrics-host {cfg.metrics_host} --metrics-port {cfg.metrics_port}: {exc}", file=sys.stderr)
            return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    workers = [ModelWorker(cfg, m, metrics, stop) for m in models]
    for w in workers:
        w.prepare()
        w.start()
    log.info("worker %s serving %s from %s", cfg.consumer, ", ".join(m.name for m in models), redact_url(cfg.redis_url))
    print(f"worker {cfg.consumer} ready: {', '.join(m.name for m in models)}", flush=True)
    while not stop.is_set() and all(w.is_alive() for w in workers):
        stop.wait(0.5)
    crashed = not stop.is_set()   # a model thread died of an unexpected error (logged above)
    stop.set()
    code = drain(workers, cfg.drain_timeout_s)
    return 1 if crashed else code


def drain(workers: list[ModelWorker], timeout_s: float) -> int:
    """SIGTERM/SIGINT: stop taking jobs, answer and acknowledge the batch in hand, deregister; exit 0
    within timeout_s. A batch still running then stays pending and another worker reclaims it."""
    for w in workers:
        w.withdraw()
    deadline = time.monotonic() + timeout_s
    for w in workers:
        w.drained.wait(max(0.0, deadline - time.monotonic()))
    late = [w.model.name for w in workers if not w.drained.is_set()]
    if late:
        log.warning("drain timeout (%.1fs, --drain-timeout) passed with a batch of %s still running; its jobs stay "
                    "pending for another worker to reclaim", timeout_s, ", ".join(late))
    else:
        log.info("drained: every job this worker took was answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
