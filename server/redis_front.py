"""Redis mode, front side: XADD a job, then wait for its one reply with BLPOP (no polling)."""
from __future__ import annotations

import time
from contextlib import nullcontext

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .batching import BatchResult, Job
from .errors import APIError
from .redisq import Keys, decode_reply, encode_job

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def connect(url: str) -> redis.Redis:
    """A client that fails fast (no retries, 1 s connect timeout) and reconnects on the next call."""
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=None, socket_keepalive=True,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


def unreachable(url: str, exc: Exception) -> APIError:
    return APIError(503, f"queue unavailable: Redis at {url} is unreachable ({type(exc).__name__}); "
                         "retry shortly", retry_after=1)


class RedisDispatcher:
    def __init__(self, url: str, prefix: str = "srv", max_queue: int = 256, heartbeat_s: float = 5.0):
        self.url, self.keys, self.max_queue, self.heartbeat_s = url, Keys(prefix), max_queue, heartbeat_s
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:   # lazily: nothing connects at import or app creation
            self._client = connect(self.url)
        return self._client

    def depth(self, model: str) -> int:
        try:
            return int(self.client.xlen(self.keys.jobs(model)))
        except REDIS_ERRORS:
            return -1

    def workers(self, model: str) -> int:
        return int(self.client.zcount(self.keys.workers(model), time.time() - self.heartbeat_s, "+inf"))

    def ready(self, model: str) -> tuple[bool, str]:
        try:
            self.client.ping()
            n = self.workers(model)
        except REDIS_ERRORS as exc:
            return False, f"Redis at {self.url} is unreachable ({type(exc).__name__})"
        if n == 0:
            return False, f"no live worker for model {model!r}; start `python -m server.worker`"
        return True, f"{n} worker(s)"

    def solo_batches(self, model: str) -> int:
        """Workers run every batch on their own session."""
        return 0

    def arriving(self, model: str):
        """Workers batch from the stream and cannot see requests still being decoded: nothing to tell."""
        return nullcontext()

    def infer(self, job: Job) -> BatchResult:
        key, reply = self.keys.jobs(job.model), self.keys.reply(job.id)
        r = self.client
        try:
            depth = r.xlen(key)
            if depth >= self.max_queue:
                raise APIError(503, f"model {job.model!r} has {depth} queued jobs (--max-queue {self.max_queue}); "
                                    "retry shortly", retry_after=1)
            r.xadd(key, encode_job(job, reply))
            got = r.blpop([reply], timeout=max(0.01, job.deadline - time.time()))
        except REDIS_ERRORS as exc:
            raise unreachable(self.url, exc) from exc
        if got is None:
            raise APIError(504, f"no answer within the request deadline ({job.deadline - job.enqueued:.1f}s, "
                                "--timeout-s); workers are overloaded or down")
        meta, probs = decode_reply(got[1])
        if "error" in meta:
            raise APIError(int(meta.get("status", 500)), meta["error"])
        return BatchResult(probs, int(meta["batch_rows"]), float(meta["queue_s"]), float(meta["infer_s"]))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
