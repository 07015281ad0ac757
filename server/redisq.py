"""The Redis Streams protocol shared by the HTTP front and the workers.

Keys (``P`` is ``--prefix``, ``M`` the model name, ``S`` the first 16 hex digits of the bundle
checksum): every key of a model is a key of one bundle of it, so a worker holding another bundle
never sees a job for this one and never counts as live for it.

- ``P:jobs:M:S``       stream of jobs; consumer group ``workers``
- ``P:dead:M:S``       dead-letter stream (jobs that failed ``--max-deliveries`` times)
- ``P:reply:ID``       list that receives exactly one reply (expires after ``--reply-ttl-s``)
- ``P:workers:M:S``    sorted set of live worker consumers (score: last heartbeat, Redis ``TIME``)
- ``P:execution:M:S``  hash: worker consumer -> how it runs the model (device, backend, provider)
- ``P:rows:M:S``       model rows (images x views) of the jobs in the stream (``--max-queue-rows``)
- ``P:stats:M:S``      hash of counters (replied, expired, refused, dead)
- ``P:bundles:M``      sorted set ``S:VERSION`` -> last heartbeat of any worker holding that bundle
                       (only to name them when no worker holds the front's bundle)

Every machine keeps its own clock, so nothing compares one machine's ``time.time()`` with another's:
a job's deadline is relative (``ttl_ms``, counted from its stream entry id, which Redis stamps with
its own clock), heartbeats are scored with Redis ``TIME`` inside the scripts below, and a worker
converts between Redis time and its own clock with an offset it measures at every heartbeat.

A job entry holds the preprocessed uint8 crops, never floats or base64: fields ``id``, ``rid``
(the HTTP request id), ``reply``, ``ttl_ms``, ``rttl`` (the front's ``--reply-ttl-s``), ``ver``
and ``sum`` (model version and full bundle checksum the front expects: a worker holding another
refuses the job, a guard behind the per-bundle stream), ``n`` (images), ``v`` (views per image),
``merge``, ``shape`` (``R,3,H,W``) and ``pixels`` (R*3*H*W bytes). A reply is one JSON line, then
raw float32 probabilities (n, K) when it is not an error.
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

# Live workers of one bundle on Redis' clock: KEYS[1] the bundle's workers set, KEYS[2] the model's
# bundles set, ARGV[1] the heartbeat window (s). Returns {live workers, "S:VERSION ..." of the bundles
# whose workers beat in the window (only looked up when none holds this one: the error names them)}.
LIVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
if n > 0 then return {n, ''} end
return {0, table.concat(redis.call('ZRANGEBYSCORE', KEYS[2], now - tonumber(ARGV[1]), '+inf'), ' ')}
"""

# Heartbeat on Redis' clock; forgets consumers (and bundles) silent for a minute. Returns Redis
# TIME (s, us) so the worker can measure its clock's offset. KEYS[1] the bundle's workers set,
# KEYS[2] its execution hash, KEYS[3] the model's bundles set; ARGV[1] consumer name, ARGV[2] how it
# runs the model (JSON: device, backend, provider), ARGV[3] the bundle as "S:VERSION".
HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 60)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 60)
return t
"""

# A worker keeps the entries of a long batch its own: XCLAIM ... JUSTID resets their idle time (so
# no other worker's XAUTOCLAIM takes them after --claim-idle-ms) without counting a delivery. Only
# entries this consumer still holds are touched: one another worker already reclaimed stays there.
# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids. Returns how many it kept.
REFRESH_SCRIPT = """
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
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

# May a job be enqueued? One round trip for every check: a live worker of this bundle, the job
# count, the row count. KEYS: jobs stream, workers set, rows counter, the model's bundles set. ARGV:
# heartbeat window (s), max jobs, max rows, this job's rows. Returns {'ok', 0} or {reason, figure}
# (for 'noworker', the figure is the live bundles of other workers, as LIVE_SCRIPT names them). The pixels travel in a separate
# MULTI (XADD + INCRBY): through the script they would be copied into Lua and back (about 1.6x the
# front's Redis time per 224 px request, measured here).
ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[1]), '+inf') == 0 then
  return {'noworker', table.concat(redis.call('ZRANGEBYSCORE', KEYS[4], now - tonumber(ARGV[1]), '+inf'), ' ')}
end
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

KEY_CHECKSUM_HEX = 16   # 64 bits of the bundle checksum name its keys; the job's `sum` holds all of it


class Keys:
    """Key names (module docstring). Every per-model key is per bundle: ``checksum`` is the
    bundle's (``bundle_checksum``), cut to KEY_CHECKSUM_HEX digits."""

    def __init__(self, prefix: str = "srv"):
        self.prefix = prefix

    def _of(self, kind: str, model: str, checksum: str) -> str:
        if not checksum:
            raise ValueError(f"no bundle checksum for model {model!r}: Redis keys are per bundle")
        return f"{self.prefix}:{kind}:{model}:{checksum[:KEY_CHECKSUM_HEX]}"

    def jobs(self, model: str, checksum: str) -> str:
        return self._of("jobs", model, checksum)

    def dead(self, model: str, checksum: str) -> str:
        return self._of("dead", model, checksum)

    def reply(self, job_id: str) -> str:
        return f"{self.prefix}:reply:{job_id}"

    def workers(self, model: str, checksum: str) -> str:
        return self._of("workers", model, checksum)

    def execution(self, model: str, checksum: str) -> str:
        return self._of("execution", model, checksum)

    def rows(self, model: str, checksum: str) -> str:
        return self._of("rows", model, checksum)

    def stats(self, model: str, checksum: str) -> str:
        return self._of("stats", model, checksum)

    def bundles(self, model: str) -> str:
        return f"{self.prefix}:bundles:{model}"


def bundle_member(checksum: str, version: str) -> str:
    """A bundle in ``P:bundles:M``: ``S:VERSION`` (S has a fixed length, so a ':' in VERSION is fine)."""
    return f"{checksum[:KEY_CHECKSUM_HEX]}:{version}"


def describe_bundles(members) -> str:
    """'S:VERSION S2:V2' (LIVE/ADMIT scripts) -> 'version V (bundle sha256 S...), ...' for messages."""
    text = members.decode(errors="replace") if isinstance(members, bytes) else str(members or "")
    return ", ".join(f"version {m[KEY_CHECKSUM_HEX + 1:] or '?'} (bundle sha256 {m[:12]})" for m in text.split())


def bundle_checksum(model) -> str:
    """sha256 of the bundle's manifest.json (it records every artifact's sha256, and an ensemble's
    its members' manifests); for a model with no manifest file (tests), of its manifest dict."""
    path = Path(model.path) / "manifest.json"
    if path.is_file():
        return manifest_checksum(model.path)
    return hashlib.sha256(json.dumps(model.manifest, sort_keys=True, default=str).encode()).hexdigest()


def manifest_checksum(bundle_dir) -> str:
    """sha256 of BUNDLE_DIR/manifest.json: the checksum that names a bundle's Redis keys."""
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()


def stream_id_key(entry_id) -> tuple[int, int]:
    """'1700000000000-10' -> (1700000000000, 10): stream ids order by numbers, not as strings."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)).partition("-")
    return int(ms), int(seq or 0)


def encode_job(job: Job, reply_key: str, ttl_s: float | None = None, reply_ttl_s: int = 60) -> dict:
    """Entry fields; the deadline travels as a time to live (default: what is left of it now),
    counted from the entry id's Redis time; ``reply_ttl_s`` is how long the reply may wait unread."""
    px = np.ascontiguousarray(job.pixels, dtype=np.uint8)
    ttl_s = job.deadline - time.time() if ttl_s is None else ttl_s
    return {"id": job.id, "rid": job.request_id, "reply": reply_key, "ttl_ms": max(1, int(ttl_s * 1000)),
            "rttl": int(reply_ttl_s),
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


def reply_ttl_of(fields: dict, cap_s: int) -> int:
    """How long a job's reply may wait unread (s): the front's ``rttl``, capped by the worker's
    ``--reply-ttl-s`` (each side bounds what it may leave in Redis); ``cap_s`` for a job with none."""
    raw = fields.get(b"rttl", fields.get("rttl"))
    try:
        front = int(raw)
    except (TypeError, ValueError):
        return cap_s
    return max(1, min(front, cap_s))


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
