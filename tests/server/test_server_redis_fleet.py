"""Redis mode across machines and versions (real redis-server, in-process workers, fake model):
redacted URLs, skewed clocks, version checks, Redis refusing commands, row limits, the fast 503
with no live worker, stream-id order in dead-lettering, worker drain and consumer clean-up, keys
per bundle, long batches kept by their worker, the front's first use from many threads, reply TTLs
and the worker's flags."""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

import server.batching
import server.redis_front
import server.redis_worker
import server.worker
from server.batching import Job
from server.redis_front import redact_url
from server.redisq import GROUP, LEAVE_SCRIPT, Keys, bundle_checksum, encode_job, stream_id_key
from server_fixtures import (digits_bundle, free_port, keys_of, make_fake_model, png_bytes, redis_proc,  # noqa: F401
                             redis_url)
from test_server_redis import FAKE, Workers, fake_heartbeat, front, wait_until, want

KEYS = Keys()


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


def post_png(c, seed=0):
    return c.post("/predict", data=png_bytes(seed=seed), content_type="image/png")


def post_many(c, n):
    files = [(io.BytesIO(png_bytes(seed=i)), f"{i}.png") for i in range(n)]
    return c.post("/predict", data={"file": files}, content_type="multipart/form-data")


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@db.example:6379/0", "redis://:***@db.example:6379/0"),
    ("redis://app:s3cret@db.example/0", "redis://app:***@db.example/0"),
    ("rediss://s3cret@db.example/0", "rediss://***@db.example/0"),
    ("redis://db.example/0?password=s3cret&ssl_cert_reqs=none", "redis://db.example/0?password=***&ssl_cert_reqs=none"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redact_url_hides_passwords(url, shown):
    assert redact_url(url) == shown


def test_a_password_in_the_url_never_reaches_http_bodies_or_logs(caplog):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"   # nothing listens there
    c = front(url)
    r = post_png(c)
    assert r.status_code == 503 and "redis://:***@127.0.0.1" in r.get_json()["error"]
    ready = c.get("/v2/health/ready")
    assert ready.status_code == 503 and "***" in ready.get_data(as_text=True)
    for resp in (r, ready):
        assert "s3cret" not in resp.get_data(as_text=True)
    from server.config import WorkerConfig
    from server.metrics import ServerMetrics
    with caplog.at_level(logging.WARNING, logger="server.worker"):
        server.worker.ModelWorker(WorkerConfig(redis_url=url), make_fake_model(), ServerMetrics("worker"),
                                  threading.Event()).prepare()
    assert "***" in caplog.text and "s3cret" not in caplog.text


def test_a_malformed_redis_url_is_refused_at_start_up_naming_the_flag(capsys):
    from server.app import create_app
    from server.config import ServerConfig
    with pytest.raises(ValueError, match=r"--redis-url http://:\*\*\*@db/0: Redis URL must specify"):
        create_app(ServerConfig(redis_url="http://:s3cret@db/0"), models=[make_fake_model()])
    assert server.worker.main(["--redis-url", "redis://:s3cret@db:port/0", "--bundle", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--redis-url redis://:***@db:port/0" in err and "s3cret" not in err


def test_a_redis_that_never_answers_is_a_503_not_a_hang(monkeypatch):
    # a partition: the TCP connection opens (the kernel accepts it) but no reply ever comes
    monkeypatch.setattr(server.redis_front, "SOCKET_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        c = front(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout_s=0.5)
        r = post_png(c)
    assert r.status_code == 503 and "unreachable (TimeoutError)" in r.get_json()["error"]


class SkewedClock:
    """The time module of a machine whose wall clock is off by skew_s."""

    def __init__(self, skew_s: float):
        self.skew_s = skew_s

    def time(self) -> float:
        return time.time() + self.skew_s

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.parametrize("skew_s", [30.0, -30.0])
def test_a_worker_whose_clock_is_off_by_30s_is_live_and_its_jobs_do_not_expire(redis_url, redis_proc, monkeypatch,
                                                                                skew_s):
    # Worker side only (the front keeps the true clock). +30 s made every job look expired; -30 s made
    # every heartbeat look 30 s old, so the front was never ready.
    monkeypatch.setattr(server.redis_worker, "time", SkewedClock(skew_s))
    monkeypatch.setattr(server.batching, "time", SkewedClock(skew_s))
    fake = make_fake_model()
    w = Workers(redis_url, fake, n=1)
    c = front(redis_url, timeout_s=3)
    try:
        assert c.get("/v2/health/ready").status_code == 200
        data = png_bytes(seed=5)
        r = c.post("/predict", data=data, content_type="image/png")
        assert r.status_code == 200, r.get_json()
        p = r.get_json()["predictions"][0]
        full = np.zeros(3)
        full[p["indices"]] = p["probabilities"]
        np.testing.assert_allclose(full, want(fake, data), rtol=1e-4, atol=1e-5)
        assert 0 <= r.get_json()["timings_ms"]["queue"] < 3000   # measured on one clock, not off by 30 s
    finally:
        w.close()
    rc = redis_proc.client()
    assert rc.hget(FAKE.stats, "expired") is None
    assert int(rc.get(FAKE.rows)) == 0                   # the queued-row count went back to 0


def test_a_worker_holding_another_bundle_takes_no_job_and_is_not_live_for_it(redis_url, redis_proc):
    # Before keys per bundle checksum, a worker of version "test" counted as live for a front of
    # 2026.11 (readiness 200) and took its jobs only to answer them 409.
    calls: list[int] = []
    w = Workers(redis_url, make_fake_model(calls=calls), n=1)    # version "test"
    newer = make_fake_model()
    newer.version = "2026.11"
    newer.manifest = {"version": newer.version}                    # a real manifest records its version
    other_build = make_fake_model()                                # same version, other bundle contents
    other_build.manifest = {"rebuilt": True}
    try:
        for model in (newer, other_build):
            c = front_with(redis_url, model)
            ready = c.get("/v2/health/ready")
            assert ready.status_code == 503                        # the live worker holds another bundle
            r = c.post("/predict", data=png_bytes(), content_type="image/png")
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.get_json()
            msg = r.get_json()["error"]
            assert f"no live worker for model 'fake' version {model.version} (bundle sha256 " \
                   f"{bundle_checksum(model)[:12]})" in msg
            # it names the bundle the live workers hold, and the fix
            assert f"other bundles of this model: version test (bundle sha256 {FAKE.checksum[:12]})" in msg
            assert "same bundle" in msg and "start workers of the new bundle before its fronts" in msg
            assert redis_proc.client().xlen(keys_of(model).jobs) == 0   # nothing queued for nobody
        c = front(redis_url)
        assert c.get("/v2/health/ready").status_code == 200        # the matching front sees its worker
        assert post_png(c).status_code == 200
    finally:
        w.close()
    assert calls == [1]                                            # the worker computed only its own job
    rc = redis_proc.client()
    assert rc.hget(FAKE.stats, "refused") is None and rc.xlen(FAKE.jobs) == 0
    assert w.threads[0].metrics.predictions.labels("fake", "failure")._value.get() == 0


def test_a_job_naming_another_bundle_in_this_stream_is_still_refused_with_409(redis_url, redis_proc, caplog):
    # The guard behind the per-bundle stream (a job written by hand, or a 64-bit key collision):
    # answered 409 naming both bundles, never with this bundle's labels.
    w = Workers(redis_url, make_fake_model(), n=1)
    other = make_fake_model()
    other.version = "2026.11"
    other.manifest = {"version": other.version}
    rc = redis_proc.client()
    job = Job(model="fake", pixels=np.zeros((1, 3, 32, 32), np.uint8), n_images=1, id="stray", request_id="upgrade-1",
              model_version=other.version, bundle_checksum=bundle_checksum(other))
    try:
        with caplog.at_level(logging.ERROR, logger="server.worker"):
            rc.xadd(FAKE.jobs, encode_job(job, KEYS.reply(job.id), ttl_s=30))
            got = rc.blpop([KEYS.reply(job.id)], timeout=10)
    finally:
        w.close()
    assert got is not None
    meta = json.loads(got[1].split(b"\n")[0])
    assert meta["status"] == 409 and "version 2026.11" in meta["error"] and "holds version test" in meta["error"]
    assert bundle_checksum(other)[:12] in meta["error"] and "same bundle" in meta["error"]
    assert [rec.request_id for rec in caplog.records if "holds version test" in rec.getMessage()] == ["upgrade-1"]
    assert rc.hget(FAKE.stats, "refused") == b"1" and rc.xlen(FAKE.jobs) == 0


def front_with(url, model, **kw):
    from server.app import create_app
    from server.config import ServerConfig
    return create_app(ServerConfig(redis_url=url, timeout_s=10, **kw), models=[model]).test_client()


def test_no_live_worker_is_a_fast_503_not_a_504_after_the_deadline(redis_url):
    c = front(redis_url, timeout_s=60)
    r = post_png(c)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert "no live worker" in r.get_json()["error"] and "python -m server.worker" in r.get_json()["error"]


def test_queued_rows_are_limited_by_max_queue_rows(redis_url, redis_proc):
    c = front(redis_url, timeout_s=2, max_queue_rows=3)
    rc = redis_proc.client()
    fake_heartbeat(rc)                                            # alive, but never answers
    first = {}
    t = threading.Thread(target=lambda: first.update(r=post_many(c, 2)))
    t.start()
    try:
        assert wait_for(lambda: rc.xlen(FAKE.jobs) == 1)
        r = post_many(c, 2)                                       # 2 queued + 2 > 3
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "2 model rows queued" in r.get_json()["error"] and "--max-queue-rows 3" in r.get_json()["error"]
        r = post_many(c, 4)                                       # could never fit: not a retry
        assert r.status_code == 413 and "at most 3 (--max-queue-rows)" in r.get_json()["error"]
        assert post_png(c).status_code == 504                     # 1 more row still fits (nobody answers it)
    finally:
        t.join(10)
    assert first["r"].status_code == 504


def test_redis_refusing_commands_is_a_503_on_the_front_and_workers_keep_going(redis_url, redis_proc, caplog):
    rc = redis_proc.client()
    w = Workers(redis_url, make_fake_model(), n=1)
    c = front(redis_url)
    try:
        with caplog.at_level(logging.WARNING, logger="server.worker"):
            rc.config_set("maxmemory", "1")                       # every write now fails with OOM
            try:
                assert wait_for(lambda: "Redis refused a command (OutOfMemoryError" in caplog.text)
                r = post_png(c)
                assert r.status_code == 503 and r.headers["Retry-After"] == "1"
                msg = r.get_json()["error"]
                assert "refused the command (OutOfMemoryError" in msg and "maxmemory" in msg
            finally:
                rc.config_set("maxmemory", "0")
        assert all(t.is_alive() for t in w.threads)               # the thread retried instead of dying
        assert wait_for(lambda: c.get("/v2/health/ready").status_code == 200)
        assert post_png(c).status_code == 200
    finally:
        w.close()


def test_stream_ids_order_by_number_so_dead_lettering_counts_deliveries(redis_url, redis_proc):
    assert sorted([b"5-10", b"5-9", b"40-0", "5-100"], key=stream_id_key) == [b"5-9", b"5-10", "5-100", b"40-0"]
    # Two poison jobs whose ids end in -9 and -10: compared as strings, the pending range between
    # them was empty, deliveries were never counted and the jobs were retried forever.
    bad = make_fake_model()

    def broken(x):
        raise RuntimeError("model exploded")
    bad.predict = broken
    rc = redis_proc.client()
    stream = FAKE.jobs
    rc.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ms = int(rc.time()[0]) * 1000 + 1000
    for seq in (9, 10):
        job = Job(model="fake", pixels=np.zeros((1, 3, 32, 32), np.uint8), n_images=1, id=f"j{seq}",
                  model_version=bad.version, bundle_checksum=bundle_checksum(bad))
        rc.xadd(stream, encode_job(job, KEYS.reply(job.id), ttl_s=30), id=f"{ms}-{seq}")
    w = Workers(redis_url, bad, n=1, claim_idle_ms=100, max_deliveries=1)
    try:
        assert wait_for(lambda: rc.xlen(FAKE.dead) == 2)
    finally:
        w.close()
    for seq in (9, 10):
        replies = rc.lrange(KEYS.reply(f"j{seq}"), 0, -1)
        assert len(replies) == 1 and b"dead-letter" in replies[0]
    assert rc.xlen(stream) == 0


def test_a_draining_worker_answers_the_batch_in_hand_and_leaves_the_rest(redis_url, redis_proc):
    entered, release = threading.Event(), threading.Event()
    fake = make_fake_model()
    compute = fake.predict

    def slow(x):
        entered.set()
        release.wait(10)
        return compute(x)
    fake.predict = slow
    w = Workers(redis_url, fake, n=1, max_delay_ms=0)
    worker = w.threads[0]
    c = front(redis_url, timeout_s=20)
    rc = redis_proc.client()
    got: dict = {}
    t1 = threading.Thread(target=lambda: got.update(a=post_png(c, 1)))
    t1.start()
    assert entered.wait(10)                                       # the worker holds job a, mid-batch
    t2 = threading.Thread(target=lambda: got.update(b=post_png(c, 2)))
    t2.start()
    try:
        assert wait_for(lambda: rc.xlen(FAKE.jobs) == 2)  # job b queued behind it
        w.stop.set()                                              # what main() does on SIGTERM
        worker.withdraw()
        assert rc.zcard(FAKE.workers) == 0                # fronts stop counting it at once
        release.set()
        assert worker.drained.wait(10)
        t1.join(10)
        assert got["a"].status_code == 200                        # answered and acknowledged
        assert rc.xlen(FAKE.jobs) == 1 and rc.xpending(FAKE.jobs, GROUP)["pending"] == 0
        assert rc.xinfo_consumers(FAKE.jobs, GROUP) == []  # consumer removed: it held nothing
        w2 = Workers(redis_url, make_fake_model(), n=1)            # job b is left for another worker
        t2.join(15)
        w2.close()
        assert got["b"].status_code == 200
    finally:
        release.set()
        w.close()


def test_consumers_are_removed_only_when_they_hold_nothing(redis_url, redis_proc, monkeypatch):
    rc = redis_proc.client()
    stream = FAKE.jobs
    rc.xgroup_create(stream, GROUP, id="0", mkstream=True)
    rc.xadd(stream, {"id": "x"})
    rc.xreadgroup(GROUP, "holder", {stream: ">"}, count=1)        # a killed worker that held an entry
    rc.xgroup_createconsumer(stream, GROUP, "idle")               # a killed worker that held nothing
    leave = rc.register_script(LEAVE_SCRIPT)
    assert leave(keys=[stream, FAKE.workers], args=[GROUP, "holder"]) == 1
    names = lambda: sorted(c["name"].decode() for c in rc.xinfo_consumers(stream, GROUP))  # noqa: E731
    assert names() == ["holder", "idle"]                          # DELCONSUMER would have lost its entry
    monkeypatch.setattr(server.redis_worker, "DEAD_CONSUMER_IDLE_MS", -1)
    w = Workers(redis_url, make_fake_model(), n=1)
    try:
        assert wait_for(lambda: "idle" not in names())
        assert "holder" in names()
    finally:
        w.close()


def test_the_front_start_up_line_hides_the_password(digits_bundle, capsys, monkeypatch):
    import server.serving
    from server.__main__ import config_from_args

    monkeypatch.setattr(server.serving, "one_torch_thread", lambda: None)   # process-wide settings: not here
    monkeypatch.setattr(server.serving, "setup_logging", lambda *a: None)
    cfg, a = config_from_args(["--bundle", str(digits_bundle), "--redis-url", "redis://:s3cret@127.0.0.1:1/0"])
    server.serving.build_app(cfg, a)   # a Redis front connects lazily: nothing listens there, nothing is asked
    out = capsys.readouterr().out
    assert "(redis redis://:***@127.0.0.1:1/0)" in out and "s3cret" not in out


def test_a_batch_3x_longer_than_claim_idle_is_computed_once_not_reclaimed(redis_url, redis_proc):
    # Before the keeper, the second worker's XAUTOCLAIM took the entry after --claim-idle-ms and
    # computed it again (and a batch held over --max-deliveries such rounds was dead-lettered).
    # The keeper also heartbeats: a lone worker in a long batch no longer looks dead to the fronts.
    idle_ms = 600
    rc = redis_proc.client()
    started, beats = [], []
    slow = make_fake_model()
    compute = slow.predict

    def holder_heartbeat():
        holder = rc.xpending_range(FAKE.jobs, GROUP, min="-", max="+", count=1)[0]["consumer"]
        return rc.zscore(FAKE.workers, holder)

    def three_idle_times(x):
        started.append(x.shape[0])
        beats.append(holder_heartbeat())
        time.sleep(3 * idle_ms / 1000)                            # the batch outlasts 3 reclaim idle times
        beats.append(holder_heartbeat())
        return compute(x)
    slow.predict = three_idle_times
    w = Workers(redis_url, slow, n=2, claim_idle_ms=idle_ms, max_deliveries=1)   # a reclaim = a dead letter
    c = front(redis_url, timeout_s=20)
    try:
        r = post_png(c)
    finally:
        w.close()
    assert r.status_code == 200, r.get_json()
    assert started == [1]                                         # computed once
    assert beats[1] > beats[0]                                    # the holder kept beating mid-batch
    assert {k.decode(): int(v) for k, v in rc.hgetall(FAKE.stats).items()} == {"replied": 1}   # answered once
    assert rc.xlen(FAKE.dead) == 0 and rc.xlen(FAKE.jobs) == 0
    assert rc.keys("srv:reply:*") == []


def test_the_fronts_first_redis_use_from_two_threads_never_sees_half_a_client(redis_url, monkeypatch):
    # The front connects on first use. It published its client before registering the scripts, so a
    # second thread arriving in between called a script that was still None: a 500 on /predict and
    # on readiness. The hook runs the second thread exactly there.
    w = Workers(redis_url, make_fake_model(), n=1)
    c = front(redis_url)
    real_connect = server.redis_front.connect
    second: dict = {}
    hooked = threading.Event()

    def connect_and_interleave(*args, **kwargs):
        client = real_connect(*args, **kwargs)
        register = client.register_script

        def register_then_let_another_thread_in(script):
            if not hooked.is_set():   # the first thread is inside its first use of Redis
                hooked.set()
                t = threading.Thread(target=lambda: second.update(post=post_png(c, 1), ready=c.get("/v2/health/ready")))
                t.start()
                t.join(30)
            return register(script)
        client.register_script = register_then_let_another_thread_in
        return client

    monkeypatch.setattr(server.redis_front, "connect", connect_and_interleave)
    try:
        first = post_png(c, 0)
    finally:
        w.close()
    assert hooked.is_set()
    assert second["post"].status_code == 200, second["post"].get_json()
    assert second["ready"].status_code == 200
    assert first.status_code == 200, first.get_json()


def test_the_fronts_reply_ttl_bounds_an_unread_reply(redis_url, redis_proc):
    # --reply-ttl-s of the front was ignored: an unread reply (its client got a 504) stayed for the
    # worker's 60 s. Now the job carries it, and the worker's own flag caps it.
    entered, release = threading.Event(), threading.Event()
    fake = make_fake_model()
    compute = fake.predict

    def held(x):
        entered.set()
        release.wait(30)
        return compute(x)
    fake.predict = held
    w = Workers(redis_url, fake, n=1)                             # worker --reply-ttl-s 60 (the default)
    c = front(redis_url, timeout_s=2, reply_ttl_s=7)
    rc = redis_proc.client()
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(r=post_png(c)))
    try:
        t.start()
        assert entered.wait(10)                                   # the worker holds the job...
        t.join(30)
        assert got["r"].status_code == 504                        # ...past the front's deadline
        release.set()
        assert wait_until(lambda: rc.hget(FAKE.stats, "replied") == b"1")
    finally:
        release.set()
        w.close()
    replies = rc.keys("srv:reply:*")
    assert len(replies) == 1 and 0 < rc.ttl(replies[0]) <= 7     # unread, and gone within the front's TTL

    from server.redisq import reply_ttl_of
    assert reply_ttl_of({b"rttl": b"7"}, 60) == 7 and reply_ttl_of({b"rttl": b"90"}, 60) == 60
    assert reply_ttl_of({}, 60) == 60                             # a job from an older front
    with pytest.raises(ValueError, match=r"--reply-ttl-s must be a whole number of seconds >= 1"):
        front(redis_url, reply_ttl_s=0)


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1 (model rows per batched call), got 0"),
    (["--reply-ttl-s", "0"], "--reply-ttl-s must be >= 1 (seconds an unread reply stays in Redis), got 0"),
    (["--claim-idle-ms", "50"], "--claim-idle-ms must be >= 100"),
    (["--max-deliveries", "0"], "--max-deliveries must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--max-delay-ms", "-1"], "--max-delay-ms must be a finite number >= 0"),
    (["--max-delay-ms", "nan"], "--max-delay-ms must be a finite number >= 0"),
    (["--drain-timeout", "inf"], "--drain-timeout must be a finite number >= 0"),
    (["--metrics-port", "70000"], "--metrics-port must be a TCP port 1-65535"),
    (["--prefix", ""], "--prefix must be a non-empty name"),
    (["--consumer", " "], "--consumer must be a non-empty name"),
])
def test_every_worker_flag_is_validated_with_exit_2(flags, message, capsys):
    assert server.worker.main(["--redis-url", "redis://127.0.0.1:1/0", "--bundle", "unused", *flags]) == 2
    assert message in capsys.readouterr().err

