"""Prometheus metrics, one registry per app or worker process (so tests can run several side by side).

Names follow Prometheus conventions: counters end in ``_total``, durations are ``_seconds``.
Several processes (gunicorn ``-w N``) scrape as one in prometheus_client's multiprocess mode: set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the processes start; every process then
writes its counters and histograms there and any one of them answers ``/metrics`` with their sums.
Values read live at scrape time (queue depth, requests in flight, solo batches) come from the
process that answers: in Redis mode the queue depth is the stream's, the same for every process.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class LiveValues:
    """A collector of values read when scraped, per model: ``gauges``/``counters`` map a metric name
    to (help, {model: fn}); process-wide ones (no label) go in ``plain``."""

    def __init__(self):
        self.gauges: dict[str, tuple[str, dict]] = {}
        self.counters: dict[str, tuple[str, dict]] = {}
        self.plain: dict[str, tuple[str, object]] = {}
        # process-wide counters: (help, fn) -> a number, or (help, fn, label) -> {label value: number}
        self.plain_counters: dict[str, tuple] = {}
        self.info: dict[str, tuple[str, dict[str, dict[str, str]]]] = {}   # name -> (help, {model: labels})
        self.workers = None   # Redis front: () -> [(model, consumer, {device, backend, provider})]

    def collect(self):
        for name, (doc, models) in self.info.items():
            keys = sorted({k for labels in models.values() for k in labels})
            g = GaugeMetricFamily(name, doc, labels=["model", *keys])
            for model, labels in models.items():
                g.add_metric([model, *(labels.get(k, "") for k in keys)], 1.0)
            yield g
        if self.workers is not None:
            g = GaugeMetricFamily("server_worker_info", "live Redis workers and how they run each model",
                                  labels=["model", "consumer", "device", "backend", "provider"])
            for model, consumer, info in self.workers():
                g.add_metric([model, consumer, *(str(info.get(k, "")) for k in ("device", "backend", "provider"))], 1.0)
            yield g
        for name, (doc, fns) in self.gauges.items():
            g = GaugeMetricFamily(name, doc, labels=["model"])
            for model, fn in fns.items():
                g.add_metric([model], float(fn()))
            yield g
        for name, (doc, fns) in self.counters.items():
            c = CounterMetricFamily(name, doc, labels=["model"])
            for model, fn in fns.items():
                c.add_metric([model], float(fn()))
            yield c
        for name, (doc, fn) in self.plain.items():
            yield GaugeMetricFamily(name, doc, value=float(fn()))
        for name, (doc, fn, *label) in self.plain_counters.items():
            if not label:
                yield CounterMetricFamily(name, doc, value=float(fn()))
                continue
            c = CounterMetricFamily(name, doc, labels=label)
            for value, n in fn().items():
                c.add_metric([value], float(n))
            yield c


class ServerMetrics:
    def __init__(self, prefix: str = "server"):
        self.prefix = prefix
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{prefix}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram(f"{prefix}_request_seconds", "HTTP request latency", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.auth_failures = Counter(f"{prefix}_auth_failures", "requests refused with 401 (no or wrong API key)",
                                     registry=r)
        self.predictions = Counter(f"{prefix}_predictions", "inference jobs by model and outcome (success: "
                                   "answered; failure: refused, timed out or failed after decoding)",
                                   ["model", "outcome"], registry=r)
        self.batch_size = Histogram(f"{prefix}_batch_size", "model rows in the batch that served each job",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_latency = Histogram(f"{prefix}_queue_seconds", "time from enqueue to batch start",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram(f"{prefix}_inference_seconds", "batched model call time",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter(f"{prefix}_images", "images classified", ["model"], registry=r)
        self.dead_letters = Counter(f"{prefix}_dead_letters", "jobs moved to the dead-letter stream",
                                    ["model"], registry=r)
        self.expired = Counter(f"{prefix}_expired_jobs", "jobs skipped because their deadline passed",
                               ["model"], registry=r)
        self.live = LiveValues()
        r.register(self.live)

    def watch_model(self, model: str, depth, solo_batches) -> None:
        """Read at scrape time: the model's queue depth and how many batches ran on its solo session."""
        self.live.gauges.setdefault(f"{self.prefix}_queue_depth",
                                    ("jobs waiting or in flight per model", {}))[1][model] = depth
        self.live.counters.setdefault(f"{self.prefix}_solo_batches", (
            "batches run on the session with every runner's threads (embedded mode, --runners > 1): lone "
            "requests", {}))[1][model] = solo_batches

    def model_info(self, model: str, **labels: str) -> None:
        """A constant 1 labelled with how the model runs (device, backend, execution provider)."""
        self.live.info.setdefault(f"{self.prefix}_model_info", (
            "how each model runs: its version, device, bundle backend and execution provider", {}))[1][model] = labels

    def watch_workers(self, fn) -> None:
        """Redis front: ``fn()`` lists the live workers' (model, consumer, execution) at scrape time."""
        self.live.workers = fn

    def watch_decode_budget(self, budget) -> None:
        """The process-wide decode memory budget (server.budget), read at scrape time."""
        p = self.prefix
        self.live.plain[f"{p}_decode_memory_limit_bytes"] = (
            "decode memory budget of this process (--max-decode-memory)", lambda: budget.capacity)
        self.live.plain[f"{p}_decode_memory_in_flight_bytes"] = (
            "decode memory reserved by requests being decoded now", lambda: budget.in_flight)
        self.live.plain[f"{p}_decode_pixels_in_flight"] = (
            "decoded pixels of the requests being decoded now", lambda: budget.pixels_in_flight)
        self.live.plain[f"{p}_decode_memory_waiting_requests"] = (
            "requests waiting for the decode memory budget now", lambda: budget.waiting)
        self.live.plain_counters[f"{p}_decode_memory_waits"] = (
            "requests that waited for the decode memory budget", lambda: budget.waits)
        self.live.plain_counters[f"{p}_decode_memory_refusals"] = (
            "requests refused by the decode memory budget: busy (503, their deadline would pass first) or "
            "too_large (413, more than the whole budget)",
            lambda: {"busy": budget.refused_busy, "too_large": budget.refused_too_large}, "reason")
        trimmer = budget.trimmer
        if trimmer is not None:
            self.live.plain_counters[f"{p}_memory_trims"] = (
                "malloc_trim calls after a burst of decoding (server.memory)", lambda: trimmer.trims)

    def watch_in_flight(self, fn) -> None:
        self.live.plain[f"{self.prefix}_requests_in_flight"] = (
            "HTTP requests being answered by this process (probes and scrapes not counted)", fn)

    def count_prediction(self, model: str, ok: bool) -> None:
        self.predictions.labels(model, "success" if ok else "failure").inc()

    def observe_result(self, model: str, batch_rows: int, queue_s: float, infer_s: float, n_images: int) -> None:
        self.batch_size.labels(model).observe(batch_rows)
        self.queue_latency.labels(model).observe(queue_s)
        self.inference_latency.labels(model).observe(infer_s)
        self.images.labels(model).inc(n_images)

    def render(self) -> bytes:
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)   # counters and histograms of every process
        merged.register(self.live)
        return generate_latest(merged)
