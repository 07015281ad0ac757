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
from .redisq import (ADMIT_SCRIPT, EXECUTION_SCRIPT, LIVE_SCRIPT, Keys, bundle_checksum, decode_reply, describe_bundles,
                     encode_job)

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


class _Connection:
    """A client and its registered scripts, published together (one attribute write) so a thread
    never sees a client whose scripts are not there yet."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.admit = client.register_script(ADMIT_SCRIPT)
        self.live = client.register_script(LIVE_SCRIPT)
        self.execution = client.register_script(EXECUTION_SCRIPT)


class RedisDispatcher:
    def __init__(self, url: str, prefix: str = "srv", max_queue: int = 256, heartbeat_s: float = 5.0,
                 max_queue_rows: int = 1024, models=None, timeout_s: float = 10.0, reply_ttl_s: int = 60):
        """models: the ServedModels whose version and bundle checksum each job names and whose
        bundle's stream it goes to (a model not among them is refused with a 404: no stream is
        its). reply_ttl_s: how long a reply may wait unread in Redis (--reply-ttl-s)."""
        if int(reply_ttl_s) != reply_ttl_s or reply_ttl_s < 1:
            raise ValueError(f"--reply-ttl-s must be a whole number of seconds >= 1 (how long an unread reply "
                             f"stays in Redis), got {reply_ttl_s}")
        self.url, self.keys, self.max_queue, self.heartbeat_s = check_url(url), Keys(prefix), max_queue, heartbeat_s
        self.max_queue_rows, self.timeout_s, self.reply_ttl_s = max_queue_rows, timeout_s, int(reply_ttl_s)
        self.identity = {m.name: (m.version, bundle_checksum(m)) for m in (models or [])}
        self._conn: _Connection | None = None

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None:   # lazily: nothing connects at import or app creation
            # Built whole, then published by one write: two first calls at once may each build one
            # (connect() opens no socket; the extra pool is dropped), never use a half-built one.
            conn = _Connection(connect(self.url, SOCKET_TIMEOUT_S + self.timeout_s))
            self._conn = conn
        return conn

    @property
    def client(self) -> redis.Redis:
        return self._connection().client

    def _checksum(self, model: str) -> str:
        try:
            return self.identity[model][1]
        except KeyError:
            raise APIError(404, f"model {model!r} is not served by this front") from None

    def depth(self, model: str) -> int:
        try:
            return int(self.client.xlen(self.keys.jobs(model, self._checksum(model))))
        except (redis.RedisError, APIError):
            return -1

    def live(self, model: str) -> tuple[int, str]:
        """(workers holding this front's bundle whose heartbeat is younger than heartbeat_s, on Redis'
        clock; when none, the other bundles of the model whose workers beat, as describe_bundles names them)."""
        checksum = self._checksum(model)
        n, others = self._connection().live(keys=[self.keys.workers(model, checksum), self.keys.bundles(model)],
                                            args=[self.heartbeat_s])
        return int(n), describe_bundles(others)

    def workers(self, model: str) -> int:
        """Live workers holding this front's bundle of ``model`` (workers of other bundles do not count)."""
        return self.live(model)[0]

    def execution(self, model: str) -> dict[str, dict]:
        """{worker consumer: {device, backend, provider}} of the live workers of this bundle (empty
        when Redis is unreachable: this only reports)."""
        try:
            checksum = self._checksum(model)
            flat = self._connection().execution(keys=[self.keys.workers(model, checksum),
                                                      self.keys.execution(model, checksum)], args=[self.heartbeat_s])
        except (redis.RedisError, APIError):
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
            n, others = self.live(model)
        except REDIS_ERRORS as exc:
            return False, f"Redis at {redact_url(self.url)} is unreachable ({type(exc).__name__})"
        except redis.ResponseError as exc:
            return False, f"Redis at {redact_url(self.url)} refused the command ({type(exc).__name__}: {exc})"
        except APIError as exc:
            return False, exc.message
        if n == 0:
            return False, self._no_worker_message(model, others)
        return True, f"{n} worker(s)"

    def _no_worker_message(self, model: str, others: str) -> str:
        version, checksum = self.identity.get(model, ("?", "?"))
        msg = (f"no live worker for model {model!r} version {version} (bundle sha256 {checksum[:12]}): none sent a "
               f"heartbeat in the last {self.heartbeat_s:g}s; start `python -m server.worker --bundle ...` with "
               "this front's bundle, or retry shortly")
        if others:
            msg += (f". Live workers hold other bundles of this model: {others}; run fronts and workers with the "
                    "same bundle (during a rolling upgrade, start workers of the new bundle before its fronts)")
        return msg

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
        checksum = self._checksum(job.model)
        version = self.identity[job.model][0]
        job.model_version, job.bundle_checksum = job.model_version or version, job.bundle_checksum or checksum
        # the stream of the bundle the job names: a worker holding another bundle never reads it
        key, rows, reply = (self.keys.jobs(job.model, job.bundle_checksum), self.keys.rows(job.model, job.bundle_checksum),
                            self.keys.reply(job.id))
        conn = self._connection()
        r = conn.client
        try:
            status, figure = conn.admit(keys=[key, self.keys.workers(job.model, job.bundle_checksum), rows,
                                              self.keys.bundles(job.model)],
                                        args=[self.heartbeat_s, self.max_queue, self.max_queue_rows, job.rows])
            self._refuse(job.model, status.decode() if isinstance(status, bytes) else status, figure)
            add = r.pipeline(transaction=True)   # the entry and its rows are counted together
            add.xadd(key, encode_job(job, reply, reply_ttl_s=self.reply_ttl_s))
            add.incrby(rows, job.rows)
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
            raise APIError(503, self._no_worker_message(model, describe_bundles(figure)), retry_after=1)
        if status == "jobs":
            raise APIError(503, f"model {model!r} has {figure} queued jobs (--max-queue {self.max_queue}); "
                                "retry shortly", retry_after=1)
        if status == "rows":
            raise APIError(503, f"model {model!r} has {figure} model rows queued (--max-queue-rows "
                                f"{self.max_queue_rows}); retry shortly", retry_after=1)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.client.close()
