"""Fault tests with real worker processes: kill -9 and SIGTERM of a worker inside a batch in the
middle of a load, and gunicorn once. The worker is held inside its batch by the test
(held_worker.py), so "it holds entries" is a state the test forces, not a moment it hopes to catch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from conftest import REPO
from export import load_bundle
from server.app import create_app
from server.client import Client
from server.config import ServerConfig
from server.redisq import GROUP
from server_fixtures import (digit_images, digits_bundle, free_port, keys_of, redis_proc, redis_url,  # noqa: F401
                             start_held_worker, start_worker, wait_for_state, wait_ready)

pytestmark = pytest.mark.slow


def pending_by_consumer(rc, keys) -> dict:
    return {(c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): c["pending"]
            for c in rc.xinfo_consumers(keys.jobs, GROUP)}


def start_load(redis_url, digits_bundle, tiny_digits, n: int) -> tuple[Future, np.ndarray]:
    """n requests from 16 threads through a Redis front, in the background. Returns a future of
    [(i, status, body)] and the expected top-1 index per image."""
    app = create_app(ServerConfig(bundles=[str(digits_bundle)], redis_url=redis_url, timeout_s=30, max_queue=1000,
                                  max_queue_rows=4096))
    ref = load_bundle(digits_bundle, threads=1)
    datas = [f.read_bytes() for f in digit_images(tiny_digits, 12)]
    want = ref.predict(datas, topk=1).probs.argmax(1)

    def one(i):
        r = app.test_client().post("/predict", data=datas[i % 12], content_type="image/png")
        return i, r.status_code, r.get_json()

    def run():
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(one, range(n)))

    runner = ThreadPoolExecutor(1)
    answers = runner.submit(run)
    runner.shutdown(wait=False)
    return answers, want


def assert_nothing_lost(rc, keys, answers, want):
    """Every request answered exactly once: 200 with the right label, or a 504 the workers counted
    as expired; replied + expired = sent; nothing left in the stream, pending, or in a reply list."""
    ok = [(i, body) for i, status, body in answers if status == 200]
    timeouts = [body for _, status, body in answers if status == 504]
    assert len(ok) + len(timeouts) == len(answers), {s for _, s, _ in answers}
    assert all("deadline" in b["error"] for b in timeouts)
    for i, body in ok:
        assert body["predictions"][0]["indices"][0] == want[i % 12]
    # a 504'd job may still sit in the stream until a worker skips it
    wait_for_state(lambda: rc.xlen(keys.jobs) == 0, timeout=30)
    stats = {k.decode(): int(v) for k, v in rc.hgetall(keys.stats).items()}
    assert stats.get("replied", 0) == len(ok) and stats.get("expired", 0) == len(timeouts), stats
    assert stats.get("replied", 0) + stats.get("expired", 0) == len(answers), stats
    assert set(stats) <= {"replied", "expired"}, stats              # nothing refused or dead-lettered
    assert rc.xlen(keys.jobs) == 0 and rc.xpending(keys.jobs, GROUP)["pending"] == 0
    assert rc.keys("srv:reply:*") == []                              # no duplicate left unread
    assert int(rc.get(keys.rows) or 0) == 0


def test_kill_9_a_worker_mid_load_loses_and_duplicates_nothing(redis_url, redis_proc, digits_bundle, tiny_digits,
                                                                tmp_path):
    # k0 alone takes the load and is held inside its third batch, so it is killed while it holds
    # entries; k1 starts after the kill and must reclaim them.
    rc, keys = redis_proc.client(), keys_of(digits_bundle)
    common = ("--claim-idle-ms", "1000", "--max-batch", "8")
    workers = [start_held_worker(redis_url, digits_bundle, tmp_path, 3, "--consumer", "k0", *common)]
    try:
        wait_ready(workers[0])
        answers, want = start_load(redis_url, digits_bundle, tiny_digits, n=240)
        assert wait_for_state((tmp_path / "entered").exists)        # k0 is inside its third batch
        held = pending_by_consumer(rc, keys).get("k0", 0)
        assert held > 0                                              # it holds unacknowledged jobs...
        os.kill(workers[0].pid, signal.SIGKILL)
        assert workers[0].wait(10) == -signal.SIGKILL
        assert pending_by_consumer(rc, keys)["k0"] == held           # ...and died holding them
        workers.append(start_worker(redis_url, digits_bundle, "--consumer", "k1", *common))
        wait_ready(workers[1])
        answers = answers.result(timeout=120)
        assert_nothing_lost(rc, keys, answers, want)                 # ...which k1 reclaimed and answered once
    finally:
        (tmp_path / "release").touch()
        for w in workers:
            w.kill()
            w.wait()


def test_sigterm_drains_a_worker_mid_load(redis_url, redis_proc, digits_bundle, tiny_digits, tmp_path):
    # d0 gets SIGTERM while it is inside a batch (held there by the test): it withdraws at once,
    # takes nothing more, answers and acknowledges the batch once released, leaves the group and
    # exits 0 within --drain-timeout; d1 serves the rest.
    rc, keys = redis_proc.client(), keys_of(digits_bundle)
    common = ("--max-batch", "8", "--drain-timeout", "60")
    workers = [start_held_worker(redis_url, digits_bundle, tmp_path, 3, "--consumer", "d0", *common)]
    try:
        wait_ready(workers[0])
        answers, want = start_load(redis_url, digits_bundle, tiny_digits, n=120)
        assert wait_for_state((tmp_path / "entered").exists)        # d0 is inside its third batch
        held = pending_by_consumer(rc, keys).get("d0", 0)
        assert held > 0
        workers.append(start_worker(redis_url, digits_bundle, "--consumer", "d1", *common))
        wait_ready(workers[1])
        workers[0].send_signal(signal.SIGTERM)
        assert wait_for_state(lambda: rc.zscore(keys.workers, "d0") is None)   # withdrawn while mid-batch
        assert pending_by_consumer(rc, keys)["d0"] == held           # still holding its batch, nothing more
        (tmp_path / "release").touch()
        assert workers[0].wait(60) == 0
        answers = answers.result(timeout=120)
        assert "d0" not in pending_by_consumer(rc, keys)             # answered its batch, so held nothing and left
        assert rc.zscore(keys.workers, "d0") is None
        assert_nothing_lost(rc, keys, answers, want)
        assert all(status == 200 for _, status, _ in answers)
    finally:
        (tmp_path / "release").touch()
        for w in workers:
            w.kill()
            w.wait()


def test_gunicorn_front_with_a_redis_worker(redis_url, digits_bundle, tiny_digits, tmp_path):
    """gunicorn -w 2 in Prometheus multiprocess mode: every scrape, whichever process answers it,
    counts the requests of both processes."""
    port = free_port()
    mpdir = tmp_path / "prom"
    mpdir.mkdir()
    env = dict(os.environ, SERVER_ARGS=f"--bundle {digits_bundle} --redis-url {redis_url}", PROMETHEUS_MULTIPROC_DIR=str(mpdir),
               PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    front = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4",
                              "-b", f"127.0.0.1:{port}", "server.wsgi:app"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker = start_worker(redis_url, digits_bundle)
    try:
        wait_ready(worker)
        c = Client(f"http://127.0.0.1:{port}", timeout=20)
        deadline = time.time() + 60
        while not c.ready() and time.time() < deadline:
            assert front.poll() is None, front.stderr.read()[-3000:]
            time.sleep(0.3)
        ref = load_bundle(digits_bundle, threads=1)
        f = digit_images(tiny_digits, 1)[0]
        out = c.predict([f, f], topk=len(ref.classes))
        got = np.zeros(len(ref.classes))
        got[out["predictions"][1]["indices"]] = out["predictions"][1]["probabilities"]
        np.testing.assert_allclose(got, ref.predict(f).probs[0], rtol=1e-4, atol=1e-5)
        while len(list(mpdir.glob("counter_*.db"))) < 2:   # each process writes its file once its app is built
            assert time.time() < deadline, "the second gunicorn worker did not start"
            time.sleep(0.3)
        # concurrent raw-body requests (the fast path) in rounds of 8 until both processes have served
        # some: the kernel spreads connections over them, but no round is sure to reach both
        n, per_process = 0, []
        while len(per_process) < 2 or min(per_process) == 0:
            assert time.time() < deadline + 60, f"one gunicorn process served nothing: {per_process}"
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: Client(c.url, timeout=20).predict(f.read_bytes()), range(8)))
            n += 8
            per_process = [_predict_200s(MultiProcessCollector.merge([str(p)])) for p in mpdir.glob("counter_*.db")]
        assert len(per_process) == 2 and sum(per_process) == n + 1, per_process   # + the first request
        for _ in range(6):   # new connections: both processes answer some of the scrapes
            with urllib.request.urlopen(c.url + "/metrics", timeout=10) as r:
                text = r.read().decode()
            line = next(ln for ln in text.splitlines() if ln.startswith('server_requests_total{endpoint="/predict",status="200"}'))
            assert float(line.split()[-1]) == n + 1, line
            assert f'server_predictions_total{{model="digits",outcome="success"}} {n + 1}.0' in text
    finally:
        for p in (front, worker):
            p.terminate()
            p.wait(10)


def _predict_200s(metrics) -> float:
    return sum(s.value for m in metrics for s in m.samples
               if s.name == "server_requests_total" and s.labels == {"endpoint": "/predict", "status": "200"})
