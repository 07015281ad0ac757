"""The Redis Streams protocol shared by the HTTP front and the workers.

Keys (``P`` is ``--prefix``, ``M`` the model name):

- ``P:jobs:M``       stream of jobs; consumer group ``workers``
- ``P:dead:M``       dead-letter stream (jobs that failed ``--max-deliveries`` times)
- ``P:reply:ID``     list that receives exactly one reply (expires after ``--reply-ttl-s``)
- ``P:workers:M``    sorted set of live worker consumers (score: last heartbeat, unix seconds)
- ``P:stats:M``      hash of counters (replied, expired, dead)

A job entry holds the preprocessed uint8 crops, never floats or base64: fields ``id``, ``reply``,
``deadline`` (unix seconds), ``enq``, ``n`` (images), ``v`` (views per image), ``merge``, ``shape``
(``R,3,H,W``) and ``pixels`` (R*3*H*W bytes). A reply is one JSON line, then raw float32
probabilities (n, K) when it is not an error.
"""
from __future__ import annotations

import json

import numpy as np

from .batching import Job

GROUP = "workers"

# Reply and acknowledge atomically, and only once: XACK returns 0 when another worker (that
# reclaimed the entry) already answered, and then nothing is written. An optional dead-letter key
# records the entry first.
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
return 1
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

    def stats(self, model: str) -> str:
        return f"{self.prefix}:stats:{model}"


def encode_job(job: Job, reply_key: str) -> dict:
    px = np.ascontiguousarray(job.pixels, dtype=np.uint8)
    return {"id": job.id, "reply": reply_key, "deadline": repr(job.deadline), "enq": repr(job.enqueued),
            "n": job.n_images, "v": job.n_views, "merge": job.merge,
            "shape": ",".join(str(s) for s in px.shape), "pixels": px.tobytes()}


def decode_job(model: str, fields: dict) -> tuple[Job, str]:
    """Stream entry fields (bytes keys/values) -> (Job, reply key). Raises ValueError when malformed."""
    f = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
    try:
        s = lambda k: f[k].decode() if isinstance(f[k], bytes) else str(f[k])  # noqa: E731
        shape = tuple(int(d) for d in s("shape").split(","))
        pixels = np.frombuffer(f["pixels"], dtype=np.uint8)
        if len(shape) != 4 or pixels.size != int(np.prod(shape)):
            raise ValueError(f"pixels hold {pixels.size} bytes, shape says {shape}")
        job = Job(model=model, pixels=pixels.reshape(shape), n_images=int(s("n")), n_views=int(s("v")),
                  merge=s("merge"), deadline=float(s("deadline")), id=s("id"), enqueued=float(s("enq")))
        if job.n_images * job.n_views != shape[0]:
            raise ValueError(f"{job.n_images} images x {job.n_views} views != {shape[0]} rows")
        return job, s("reply")
    except KeyError as exc:
        raise ValueError(f"job entry lacks field {exc}") from exc


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
