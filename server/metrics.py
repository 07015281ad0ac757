"""Prometheus metrics, one registry per app or worker process (so tests can run several side by side)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self, prefix: str = "server"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{prefix}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram(f"{prefix}_request_seconds", "HTTP request latency", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{prefix}_queue_depth", "jobs waiting or in flight per model", ["model"],
                                 registry=r)
        self.batch_size = Histogram(f"{prefix}_batch_size", "model rows in the batch that served each job",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_latency = Histogram(f"{prefix}_queue_seconds", "time from enqueue to batch start",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram(f"{prefix}_inference_seconds", "batched model call time",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.solo_batches = Gauge(f"{prefix}_solo_batches", "batches run on the session with every runner's "
                                  "threads (embedded mode, --runners > 1): lone requests", ["model"], registry=r)
        self.images = Counter(f"{prefix}_images", "images classified", ["model"], registry=r)
        self.dead_letters = Counter(f"{prefix}_dead_letters", "jobs moved to the dead-letter stream",
                                    ["model"], registry=r)
        self.expired = Counter(f"{prefix}_expired_jobs", "jobs skipped because their deadline passed",
                               ["model"], registry=r)

    def observe_result(self, model: str, batch_rows: int, queue_s: float, infer_s: float, n_images: int) -> None:
        self.batch_size.labels(model).observe(batch_rows)
        self.queue_latency.labels(model).observe(queue_s)
        self.inference_latency.labels(model).observe(infer_s)
        self.images.labels(model).inc(n_images)

    def render(self) -> bytes:
        return generate_latest(self.registry)
