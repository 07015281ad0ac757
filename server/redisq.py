"""The Redis Streams protocol shared by the HTTP front and the workers.

Keys (``P`` is ``--prefix``, ``M`` the model name):

- ``P:jobs:M``       stream of jobs; consumer group ``workers``
- ``P:dead:M``       dead-letter stream (jobs that failed ``--max-deliveries`` times)
- ``P:reply:ID``     list that receives exactly one reply (expires after ``--reply-ttl-s``)
- ``P:workers:M``    sorted set of live worker consumers (score: last heartbeat, Redis ``TIME``)
- ``P:execution:M``  hash: worker consumer -> how it runs the model (device, backend, provider)
- ``P:rows:M``       model rows (images x views) of the jobs in the stream (``--max-queue-rows``)
- ``P:stats:M``      hash of counters (replied, expired, refused, dead)

Every machine keeps its own clock, so nothing compares one machine's ``time.time()`` with another's:
a job's deadline is relative (``ttl_ms``, counted from its stream entry id, which Redis stamps with
its own clock), heartbeats are scored with Redis ``TIME`` inside the scripts below, and a worker
converts between Redis time and its own clock with an offset it measures at every heartbeat.

A job entry holds the preprocessed uint8 crops, never floats or base64: fields ``id``, ``rid``
(the HTTP request id), ``reply``, ``ttl_ms``, ``ver`` and ``sum`` (model version and bundle
checksum the front expects: a worker holding another refuses the job), ``n`` (images), ``v``
(views per image), ``merge``, ``shape`` (``R,3,H,W``) and ``pixels`` (R*3*H*W bytes). A reply is
one JSON line, then raw float32 probabilities (n, K) when it is not an error.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .batching import Job

GROUP = "workers"

# Reply and acknowledge atomically, and only once: XACK returns 0 when another worker (that
# reclaimed the entry) already answered, and then nothing is written. An optional dead-letter key
# records the entry first. The queued-row count drops by the entry's rows (never below 0).
REPLY_SCRIPT = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
if KEYS[4] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', '10000', '*', 'id', ARGV[6], 'reply', KEYS[2], 'reason', ARGV[7])
end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
if redis.call('DECRBY', KEYS[5], tonumber(ARGV[8])) < 0 then redis.call('SET', KEYS[5], 0) end
return 1
"""

# Live workers of a model on Redis' clock: KEYS[1] the workers set, ARGV[1] the heartbeat window (s).
LIVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""

# Heartbeat on Redis' clock; forgets consumers silent for a minute. Returns Redis TIME (s, us)
# so the worker can measure its clock's offset. KEYS[1] workers set, KEYS[2] execution hash,
# ARGV[1] consumer name, ARGV[2] how it runs the model (JSON: device, backend, provider).
HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 60)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return t
"""

# How the live workers run a model: {consumer: execution JSON} of those whose heartbeat is younger
# than ARGV[1] seconds. KEYS[1] workers set, KEYS[2] execution hash.
EXECUTION_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
if #live == 0 then return {} end
local info = redis.call('HMGET', KEYS[2], unpack(live))
local out = {}
for i, name in ipairs(live) do
  out[#out + 1] = name
  out[#out + 1] = info[i] or '{}'
end
return out
"""

# May a job be enqueued? One round trip for every check: a live worker, the job count, the row
# count. KEYS: jobs stream, workers set, rows counter. ARGV: heartbeat window (s), max jobs, max
# rows, this job's rows. Returns {'ok', 0} or {reason, figure}. The pixels travel in a separate
# MULTI (XADD + INCRBY): through the script they would be copied into Lua and back (about 1.6x the
# front's Redis time per 224 px request, measured here).
ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[1]), '+inf') == 0 then return {'noworker', 0} end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[2]) then return {'jobs', depth} end
local rows = 0
if depth == 0 then redis.call('SET', KEYS[3], 0) else rows = tonumber(redis.call('GET', KEYS[3]) or '0') end
if rows + tonumber(ARGV[4]) > tonumber(ARGV[3]) then return {'rows', rows} end
return {'ok', 0}
"""

# On clean shutdown: forget this consumer, but only when it holds nothing (XGROUP DELCONSUMER
# would drop its pending entries, and their clients would never get an answer).
# KEYS[1] stream, KEYS[2] workers set; ARGV[1] group, ARGV[2] consumer. Returns entries still held.
LEAVE_SCRIPT = """
redis.call('ZREM', KEYS[2], ARGV[2])
local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if held['err'] then return 0 end   -- no stream or no group: nothing to forget
if #held > 0 then return 1 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 0
"""

class Keys:
    def __init__(self, prefix: str = "srv"):
        self.prefix = prefix

    def jobs(self, model: str) -> str:
        return f"{self.prefix}:jobs:{model}"

    def dead(self, model: str) -> str:
        return f"{self.prefix}:dead:{model}"

    def reply(self, job_id: str) -> str:
        return f"{self.prefix}:reply:{job_id}"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"

    def execution(self, model: str) -> str:
        return f"{self.prefix}:execution:{model}"

    def rows(self, model: str) -> str:
        return f"{self.prefix}:rows:{model}"

    def stats(self, model: str) -> str:
        return f"{self.prefix}:stats:{model}"


def bundle_checksum(model) -> str:
    """sha256 of the bundle's manifest.json (it records every artifact's sha256, and an ensemble's
    its members' manifests'); for a model with no manifest file (tests), of its manifest dict."""
    path = Path(model.path) / "manifest.json"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(model.manifest, sort_keys=True, default=str).encode()).hexdigest()


def stream_id_key(entry_id) -> tuple[int, int]:
    """'1700000000000-10' -> (1700000000000, 10): stream ids order by numbers, not as strings."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)).partition("-")
    return int(ms), int(seq or 0)


def encode_job(job: Job, reply_key: str, ttl_s: float | None = None) -> dict:
    """Entry fields; the deadline travels as a time to live (default: what is left of it now),
    counted from the entry id's Redis time."""
    px = np.ascontiguousarray(job.pixels, dtype=np.uint8)
    ttl_s = job.deadline - time.time() if ttl_s is None else ttl_s
    return {"id": job.id, "rid": job.request_id, "reply": reply_key, "ttl_ms": max(1, int(ttl_s * 1000)),
            "ver": job.model_version, "sum": job.bundle_checksum, "n": job.n_images, "v": job.n_views, "merge": job.merge,
            "shape": ",".join(str(s) for s in px.shape), "pixels": px.tobytes()}


def decode_job(model: str, fields: dict, entry_id=None, clock_offset_s: float = 0.0) -> tuple[Job, str]:
    """Stream entry -> (Job, reply key). The job's enqueue time and deadline are on the caller's
    clock: the entry id's Redis time minus ``clock_offset_s`` (without an id: now). Raises
    ValueError when malformed."""
    f = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
    try:
        s = lambda k: f[k].decode() if isinstance(f[k], bytes) else str(f[k])  # noqa: E731
        shape = tuple(int(d) for d in s("shape").split(","))
        pixels = np.frombuffer(f["pixels"], dtype=np.uint8)
        if len(shape) != 4 or pixels.size != int(np.prod(shape)):
            raise ValueError(f"pixels hold {pixels.size} bytes, shape says {shape}")
        enqueued = time.time() if entry_id is None else stream_id_key(entry_id)[0] / 1000.0 - clock_offset_s
        job = Job(model=model, pixels=pixels.reshape(shape), n_images=int(s("n")), n_views=int(s("v")),
                  merge=s("merge"), deadline=enqueued + int(s("ttl_ms")) / 1000.0, id=s("id"), enqueued=enqueued,
                  request_id=s("rid"), model_version=s("ver"), bundle_checksum=s("sum"))
        if job.n_images * job.n_views != shape[0]:
            raise ValueError(f"{job.n_images} images x {job.n_views} views != {shape[0]} rows")
        return job, s("reply")
    except KeyError as exc:
        raise ValueError(f"job entry lacks field {exc} (from a front of another release? run fronts and "
                         "workers of one release on one --prefix)") from exc


def encode_reply(meta: dict, probs: np.ndarray | None = None) -> bytes:
    head = json.dumps(meta, separators=(",", ":")).encode()
    if probs is None:
        return head + b"\n"
    p = np.ascontiguousarray(probs, dtype=np.float32)
    meta_shape = json.dumps({"shape": list(p.shape)}).encode()
    return head + b"\n" + meta_shape + b"\n" + p.tobytes()


def decode_reply(data: bytes) -> tuple[dict, np.ndarray | None]:
    head, _, rest = data.partition(b"\n")
    meta = json.loads(head)
    if not rest:
        return meta, None
    shape_line, _, raw = rest.partition(b"\n")
    shape = json.loads(shape_line)["shape"]
    return meta, np.frombuffer(raw, dtype=np.float32).reshape(shape)
