"""Redis mode, front side: admit a job (one Lua script), XADD it, then wait for its one reply with BLPOP."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from .batching import BatchResult, Job
from .errors import APIError
from .redisq import ADMIT_SCRIPT, EXECUTION_SCRIPT, LIVE_SCRIPT, Keys, bundle_checksum, decode_reply, encode_job

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# a partition must not hang a front or a worker for hours: every read gives up after this (fronts
# add their request deadline, since BLPOP legitimately waits that long)
SOCKET_TIMEOUT_S = 10.0
HEALTH_CHECK_S = 15   # PING a connection idle this long before reusing it


def redact_url(url: str | None) -> str:
    """The URL with its password (and a ``password=`` query value) replaced by ``***``: safe for
    logs, error messages and HTTP bodies."""
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            cred, host = netloc.rsplit("@", 1)
            user, sep, _ = cred.partition(":")
            netloc = f"{user}:***@{host}" if sep else f"***@{host}"   # redis://TOKEN@host: the token is a secret
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query, True)],
                          safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:   # unparsable: say nothing about it rather than leak it
        return "<unparsable Redis URL>"


def check_url(url: str) -> str:
    """Refuse a malformed --redis-url at start-up (named, password hidden), not at the first request."""
    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"--redis-url {redact_url(url)}: {exc}") from None
    return url


def connect(url: str, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A client that fails fast (no retries, 1 s connect timeout, reads bounded by socket_timeout_s)
    and reconnects on the next call."""
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=socket_timeout_s,
                                socket_keepalive=True, retry=Retry(NoBackoff(), 0),
                                health_check_interval=HEALTH_CHECK_S)


def unreachable(url: str, exc: Exception) -> APIError:
    if isinstance(exc, redis.ResponseError):   # OOM at maxmemory, READONLY after a failover, LOADING...
        return APIError(503, f"queue unavailable: Redis at {redact_url(url)} refused the command "
                             f"({type(exc).__name__}: {exc}); retry shortly", retry_after=1)
    return APIError(503, f"queue unavailable: Redis at {redact_url(url)} is unreachable ({type(exc).__name__}); "
                         "retry shortly", retry_after=1)


class RedisDispatcher:
    def __init__(self, url: str, prefix: str = "srv", max_queue: int = 256, heartbeat_s: float = 5.0,
                 max_queue_rows: int = 1024, models=None, timeout_s: float = 10.0):
        """models: the ServedModels whose version and bundle checksum each job names (a job for a
        model not among them names none, and workers refuse it with a 409)."""
        self.url, self.keys, self.max_queue, self.heartbeat_s = check_url(url), Keys(prefix), max_queue, heartbeat_s
        self.max_queue_rows, self.timeout_s = max_queue_rows, timeout_s
        self.identity = {m.name: (m.version, bundle_checksum(m)) for m in (models or [])}
        self._client: redis.Redis | None = None
        self._admit = self._live = self._execution = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:   # lazily: nothing connects at import or app creation
            self._client = connect(self.url, SOCKET_TIMEOUT_S + self.timeout_s)
            self._admit = self._client.register_script(ADMIT_SCRIPT)
            self._live = self._client.register_script(LIVE_SCRIPT)
            self._execution = self._client.register_script(EXECUTION_SCRIPT)
        return self._client

    def depth(self, model: str) -> int:
        try:
            return int(self.client.xlen(self.keys.jobs(model)))
        except redis.RedisError:
            return -1

    def workers(self, model: str) -> int:
        """Workers whose heartbeat is younger than heartbeat_s, on Redis' clock (not this machine's)."""
        _ = self.client
        return int(self._live(keys=[self.keys.workers(model)], args=[self.heartbeat_s]))

    def execution(self, model: str) -> dict[str, dict]:
        """{worker consumer: {device, backend, provider}} of the live workers (empty when Redis is
        unreachable: this only reports)."""
        try:
            _ = self.client
            flat = self._execution(keys=[self.keys.workers(model), self.keys.execution(model)], args=[self.heartbeat_s])
        except redis.RedisError:
            return {}
        out = {}
        for name, info in zip(flat[::2], flat[1::2]):
            try:
                out[name.decode(errors="replace")] = json.loads(info)
            except ValueError:
                out[name.decode(errors="replace")] = {}
        return out

    def ready(self, model: str) -> tuple[bool, str]:
        try:
            n = self.workers(model)
        except REDIS_ERRORS as exc:
            return False, f"Redis at {redact_url(self.url)} is unreachable ({type(exc).__name__})"
        except redis.ResponseError as exc:
            return False, f"Redis at {redact_url(self.url)} refused the command ({type(exc).__name__}: {exc})"
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
        if job.rows > self.max_queue_rows:
            raise APIError(413, f"the request needs {job.rows} model rows (images x TTA views), more than the "
                                f"whole queue holds (--max-queue-rows {self.max_queue_rows}); send fewer images "
                                "or views per request")
        version, checksum = self.identity.get(job.model, ("", ""))
        job.model_version, job.bundle_checksum = job.model_version or version, job.bundle_checksum or checksum
        key, reply = self.keys.jobs(job.model), self.keys.reply(job.id)
        r = self.client
        try:
            status, figure = self._admit(keys=[key, self.keys.workers(job.model), self.keys.rows(job.model)],
                                         args=[self.heartbeat_s, self.max_queue, self.max_queue_rows, job.rows])
            self._refuse(job.model, status.decode() if isinstance(status, bytes) else status, figure)
            add = r.pipeline(transaction=True)   # the entry and its rows are counted together
            add.xadd(key, encode_job(job, reply))
            add.incrby(self.keys.rows(job.model), job.rows)
            add.execute()
            got = r.blpop([reply], timeout=max(0.01, job.deadline - time.time()))
        except (*REDIS_ERRORS, redis.ResponseError) as exc:
            raise unreachable(self.url, exc) from exc
        if got is None:
            raise APIError(504, f"no answer within the request deadline ({job.deadline - job.enqueued:.1f}s, "
                                "--timeout-s); workers are overloaded or down")
        meta, probs = decode_reply(got[1])
        if "error" in meta:
            raise APIError(int(meta.get("status", 500)), meta["error"])
        return BatchResult(probs, int(meta["batch_rows"]), float(meta["queue_s"]), float(meta["infer_s"]))

    def _refuse(self, model: str, status: str, figure) -> None:
        if status == "noworker":
            raise APIError(503, f"no live worker for model {model!r} (none sent a heartbeat in the last "
                                f"{self.heartbeat_s:g}s); start `python -m server.worker --bundle ...` or retry "
                                "shortly", retry_after=1)
        if status == "jobs":
            raise APIError(503, f"model {model!r} has {figure} queued jobs (--max-queue {self.max_queue}); "
                                "retry shortly", retry_after=1)
        if status == "rows":
            raise APIError(503, f"model {model!r} has {figure} model rows queued (--max-queue-rows "
                                f"{self.max_queue_rows}); retry shortly", retry_after=1)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
