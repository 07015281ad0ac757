"""Redis Streams semantics with a real redis-server and in-process workers (fake model)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from server.app import create_app
from server.config import ServerConfig, WorkerConfig
from server.metrics import ServerMetrics
from server.redisq import GROUP
from server.redis_worker import ModelWorker
from server_fixtures import free_port, keys_of, make_fake_model, png_bytes, redis_proc, redis_url  # noqa: F401
from trainer.data.images import decode_image
from trainer.data.transforms import eval_transform


FAKE = keys_of(make_fake_model())   # the fake model's keys (every fake model has one checksum)


class Workers:
    def __init__(self, url, model, n=1, **kw):
        self.stop = threading.Event()
        self.threads = []
        for i in range(n):
            cfg = WorkerConfig(redis_url=url, consumer=f"{kw.get('name', 'w')}{i}", max_delay_ms=kw.get("max_delay_ms", 10),
                               claim_idle_ms=kw.get("claim_idle_ms", 5000), max_deliveries=kw.get("max_deliveries", 3),
                               reply_ttl_s=kw.get("reply_ttl_s", 60))
            t = ModelWorker(cfg, model, ServerMetrics("worker"), self.stop)
            t.prepare()   # as main() does before "ready": first heartbeat sent
            t.start()
            self.threads.append(t)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(5)


def fake_heartbeat(rc, keys=FAKE, consumer="ghost"):
    """A worker of the bundle of ``keys`` that looks alive (a heartbeat on Redis' clock) but never answers."""
    sec, usec = rc.time()
    rc.zadd(keys.workers, {consumer: sec + usec / 1e6})


def front(url, **kw):
    cfg = ServerConfig(redis_url=url, timeout_s=kw.pop("timeout_s", 10), **kw)
    return create_app(cfg, models=[make_fake_model()]).test_client()


def want(fake, data):
    return fake.predict(eval_transform(decode_image(data), fake.spec)[None].numpy())[0]


def test_two_workers_answer_every_job_exactly_once_in_batches(redis_url, redis_proc):
    fake = make_fake_model(delay_s=0.02)
    compute, queued = fake.predict, threading.Event()
    rc = redis_proc.client()

    def first_batches_wait_for_a_queue(x):
        # the workers' first batches wait until 6 jobs are in the stream: the next read takes the
        # ones queued behind them together, so batches above 1 are a forced state, not luck
        if not queued.is_set():
            assert wait_until(lambda: rc.xlen(FAKE.jobs) >= 6)
            queued.set()
        return compute(x)
    fake.predict = first_batches_wait_for_a_queue
    w = Workers(redis_url, fake, n=2)
    c = front(redis_url)
    imgs = [png_bytes(seed=i) for i in range(60)]

    def one(d):
        return c.post("/predict", data=d, content_type="image/png")

    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, imgs))
    finally:
        w.close()
    batch_sizes = []
    fake.predict = compute   # want() below: the model itself
    for d, r in zip(imgs, answers):
        assert r.status_code == 200, r.get_json()
        p = r.get_json()["predictions"][0]
        full = np.zeros(3)
        full[p["indices"]] = p["probabilities"]
        np.testing.assert_allclose(full, want(fake, d), rtol=1e-4, atol=1e-5)
        batch_sizes.append(r.get_json()["batch_size"])
    assert max(batch_sizes) > 1                                   # batching happened
    assert int(rc.hget(FAKE.stats, "replied")) == 60              # one reply per job, no duplicates
    assert rc.keys("srv:reply:*") == []                           # nothing left unread
    assert rc.xlen(FAKE.jobs) == 0                                # acked and deleted
    metrics = c.get("/metrics").get_data(as_text=True)
    assert 'server_batch_size_count{model="fake"} 60.0' in metrics
    total = float(metrics.split('server_batch_size_sum{model="fake"} ')[1].split()[0])
    assert total / 60 > 1.0                                       # the metric shows batches above 1


def test_deadline_exceeded_gives_504_and_the_expired_job_is_skipped(redis_url, redis_proc):
    c = front(redis_url, timeout_s=0.3)
    fake_heartbeat(redis_proc.client())
    r = c.post("/predict", data=png_bytes(), content_type="image/png")
    assert r.status_code == 504 and "deadline (0.3s, --timeout-s)" in r.get_json()["error"]
    calls = []
    w = Workers(redis_url, make_fake_model(calls=calls), n=1)
    try:
        deadline = time.time() + 10
        while redis_proc.client().hget(FAKE.stats, "expired") is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        w.close()
    assert redis_proc.client().hget(FAKE.stats, "expired") == b"1" and calls == []


def test_queue_full_gives_503_with_retry_after(redis_url, redis_proc):
    c = front(redis_url, max_queue=2)
    rc = redis_proc.client()
    fake_heartbeat(rc)
    for _ in range(2):
        rc.xadd(FAKE.jobs, {"id": "x"})
    r = c.post("/predict", data=png_bytes(), content_type="image/png")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "--max-queue" in r.get_json()["error"]


def test_redis_unreachable_is_a_quick_503():
    c = front(f"redis://127.0.0.1:{free_port()}/0")
    r = c.post("/predict", data=png_bytes(), content_type="image/png")
    # refused at connect (nothing listens): a ConnectionError, not a socket timeout after a wait
    assert r.status_code == 503 and "unreachable (ConnectionError)" in r.get_json()["error"]
    assert c.get("/v2/health/ready").status_code == 503
    assert c.get("/v2/health/live").status_code == 200


def test_stalled_entries_are_reclaimed_and_poison_jobs_dead_lettered(redis_url, redis_proc):
    fake = make_fake_model()
    rc = redis_proc.client()
    c = front(redis_url, timeout_s=15)
    # a "crashed" consumer takes the first job and never acknowledges it
    ghost_took = threading.Event()

    fake_heartbeat(rc)   # before the request: the front refuses jobs for a model with no live worker
    rc.xgroup_create(FAKE.jobs, GROUP, id="0", mkstream=True)

    def ghost():
        end = time.monotonic() + 10
        while not rc.xreadgroup(GROUP, "ghost", {FAKE.jobs: ">"}, count=1, block=100):
            if time.monotonic() > end:
                return
        ghost_took.set()

    g = threading.Thread(target=ghost, daemon=True)
    g.start()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=c.post("/predict", data=png_bytes(), content_type="image/png")))
    t.start()
    assert ghost_took.wait(10)
    w = Workers(redis_url, fake, n=1, claim_idle_ms=300)
    t.join(15)
    w.close()
    assert result["r"].status_code == 200
    assert rc.xpending(FAKE.jobs, GROUP)["pending"] == 0

    # a job that makes every worker fail is delivered max_deliveries times, then dead-lettered
    def broken(x):
        raise RuntimeError("model exploded")
    bad = make_fake_model()
    bad.predict = broken
    w = Workers(redis_url, bad, n=1, claim_idle_ms=200, max_deliveries=2)
    try:
        r = c.post("/predict", data=png_bytes(), content_type="image/png")
    finally:
        w.close()
    assert r.status_code == 500 and "dead-letter" in r.get_json()["error"]
    assert rc.xlen(FAKE.dead) == 1 and rc.xlen(FAKE.jobs) == 0


def test_redis_restart_mid_run_recovers_by_itself(redis_url, redis_proc):
    fake = make_fake_model(delay_s=0.01)
    w = Workers(redis_url, fake, n=1)
    c = front(redis_url, timeout_s=3)
    statuses: list[int] = []
    stop_load = threading.Event()

    def load():   # steady traffic across the outage: only 200, 503 (Redis gone) or 504, never a 500
        while not stop_load.is_set():
            statuses.append(c.post("/predict", data=png_bytes(seed=len(statuses) % 7), content_type="image/png").status_code)

    def seen(status, since=0):   # states the test waits for, never a fixed sleep
        return lambda: status in statuses[since:]

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        assert wait_until(seen(200))                              # served before the outage
        redis_proc.stop()
        gone = len(statuses)
        assert wait_until(seen(503, gone))                        # the load sees the outage as 503s
        r = c.post("/predict", data=png_bytes(), content_type="image/png")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "unreachable" in r.get_json()["error"]
        assert c.get("/v2/health/ready").status_code == 503
        redis_proc.start()                                        # empty: no stream, no group
        back = len(statuses)
        assert wait_until(seen(200, back), timeout=30)            # the worker recreated the group by itself
        stop_load.set()
        for t in threads:
            t.join(10)
        assert set(statuses) <= {200, 503, 504}, set(statuses)
        assert wait_until(lambda: c.get("/v2/health/ready").status_code == 200)
        assert c.post("/predict", data=png_bytes(seed=3), content_type="image/png").status_code == 200
    finally:
        stop_load.set()
        w.close()


def wait_until(cond, timeout=20.0):
    """Poll a state the test forced; the timeout only bounds a failing run."""
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()
