"""Fault tests with real worker processes: kill -9 in the middle of a load, and gunicorn once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from conftest import REPO
from export import load_bundle
from server.app import create_app
from server.client import Client
from server.config import ServerConfig
from server.redisq import GROUP, Keys
from server_fixtures import (digit_images, digits_bundle, free_port, redis_proc, redis_url,  # noqa: F401
                             start_worker, wait_ready)

pytestmark = pytest.mark.slow


def pending_by_consumer(rc) -> dict:
    return {(c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): c["pending"]
            for c in rc.xinfo_consumers(Keys().jobs("digits"), GROUP)}


def load_with_a_fault(redis_url, rc, digits_bundle, tiny_digits, fault, n=240):
    """n requests from 16 threads; after 40 answers, fault() runs once (the other threads keep the
    load going). Returns [(i, status, body)] and the expected top-1 index per image."""
    app = create_app(ServerConfig(bundles=[str(digits_bundle)], redis_url=redis_url, timeout_s=30, max_queue=1000,
                                  max_queue_rows=4096))
    ref = load_bundle(digits_bundle, threads=1)
    datas = [f.read_bytes() for f in digit_images(tiny_digits, 12)]
    want = ref.predict(datas, topk=1).probs.argmax(1)
    done, fired, lock = [], threading.Event(), threading.Lock()

    def one(i):
        r = app.test_client().post("/predict", data=datas[i % 12], content_type="image/png")
        done.append(i)
        if len(done) >= 40 and not fired.is_set():
            with lock:
                if not fired.is_set():
                    fault()
                    fired.set()
        return i, r.status_code, r.get_json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(n)))
    return answers, want


def assert_nothing_lost(rc, answers, want):
    """Every request answered exactly once: 200 with the right label, or a 504 the workers counted
    as expired; replied + expired = sent; nothing left in the stream, pending, or in a reply list."""
    keys = Keys()
    ok = [(i, body) for i, status, body in answers if status == 200]
    timeouts = [body for _, status, body in answers if status == 504]
    assert len(ok) + len(timeouts) == len(answers), {s for _, s, _ in answers}
    assert all("deadline" in b["error"] for b in timeouts)
    for i, body in ok:
        assert body["predictions"][0]["indices"][0] == want[i % 12]
    stream = keys.jobs("digits")
    deadline = time.monotonic() + 10   # a 504'd job may still sit in the stream until a worker skips it
    while rc.xlen(stream) and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = {k.decode(): int(v) for k, v in rc.hgetall(keys.stats("digits")).items()}
    assert stats.get("replied", 0) == len(ok) and stats.get("expired", 0) == len(timeouts), stats
    assert stats.get("replied", 0) + stats.get("expired", 0) == len(answers), stats
    assert set(stats) <= {"replied", "expired"}, stats              # nothing refused or dead-lettered
    assert rc.xlen(stream) == 0 and rc.xpending(stream, GROUP)["pending"] == 0
    assert all(rc.llen(k) <= 1 for k in rc.keys("srv:reply:*"))
    assert rc.keys("srv:reply:*") == []                                 # no duplicate left unread
    assert int(rc.get(keys.rows("digits")) or 0) == 0


def test_kill_9_a_worker_mid_load_loses_and_duplicates_nothing(redis_url, redis_proc, digits_bundle, tiny_digits):
    def worker(name):
        return start_worker(redis_url, digits_bundle, "--consumer", name, "--claim-idle-ms", "1000", "--max-batch", "8")

    # k0 alone takes the load, so it is killed while it holds entries; k1 starts after the kill
    # and must reclaim them.
    rc = redis_proc.client()
    workers = [worker("k0")]
    killed = {}

    def kill_k0_while_it_holds_jobs():
        # between two batches k0 briefly holds nothing: wait for a moment it holds entries
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pending = pending_by_consumer(rc)
            if pending.get("k0", 0) > 0:
                break
            time.sleep(0.002)
        os.kill(workers[0].pid, signal.SIGKILL)
        killed["pending"] = pending
        workers.append(worker("k1"))
        threading.Thread(target=wait_ready, args=(workers[1],), daemon=True).start()  # drains its output

    try:
        wait_ready(workers[0])
        answers, want = load_with_a_fault(redis_url, rc, digits_bundle, tiny_digits, kill_k0_while_it_holds_jobs)
        assert workers[0].wait(5) == -signal.SIGKILL
        assert killed["pending"].get("k0", 0) > 0                  # it died holding unacknowledged jobs...
        assert_nothing_lost(rc, answers, want)                      # ...which k1 reclaimed and answered once
    finally:
        for w in workers:
            w.kill()
            w.wait()


def test_sigterm_drains_a_worker_mid_load(redis_url, redis_proc, digits_bundle, tiny_digits):
    # d0 gets SIGTERM while it holds entries: it answers them, acknowledges them, leaves the group
    # and exits 0 within --drain-timeout; d1 serves the rest.
    rc = redis_proc.client()
    workers = [start_worker(redis_url, digits_bundle, "--consumer", f"d{i}", "--max-batch", "8", "--drain-timeout", "20")
               for i in range(2)]
    sent = {}

    def sigterm_d0_while_it_holds_jobs():
        deadline = time.monotonic() + 5
        while pending_by_consumer(rc).get("d0", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        sent["pending"] = pending_by_consumer(rc).get("d0", 0)
        workers[0].send_signal(signal.SIGTERM)

    try:
        for w in workers:
            wait_ready(w)
        answers, want = load_with_a_fault(redis_url, rc, digits_bundle, tiny_digits, sigterm_d0_while_it_holds_jobs,
                                          n=120)
        assert workers[0].wait(25) == 0
        assert sent["pending"] > 0                                  # it was stopped holding jobs...
        assert "d0" not in pending_by_consumer(rc)                  # ...answered them, so held nothing and left
        assert rc.zscore(Keys().workers("digits"), "d0") is None
        assert_nothing_lost(rc, answers, want)
        assert all(status == 200 for _, status, _ in answers)
    finally:
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
        n = 24   # concurrent raw-body requests (the fast path), spread over both processes by the kernel
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: Client(c.url, timeout=20).predict(f.read_bytes()), range(n)))
        per_process = [_predict_200s(MultiProcessCollector.merge([str(p)])) for p in mpdir.glob("counter_*.db")]
        assert len(per_process) == 2 and min(per_process) > 0, per_process   # both processes served
        for _ in range(6):   # new connections: both processes answer some of the scrapes
            with urllib.request.urlopen(c.url + "/metrics", timeout=10) as r:
                text = r.read().decode()
            line = next(ln for ln in text.splitlines() if ln.startswith('server_requests_total{endpoint="/predict",status="200"}'))
            assert float(line.split()[-1]) == n + 1, line
            assert 'server_predictions_total{model="digits",outcome="success"} 25.0' in text
    finally:
        for p in (front, worker):
            p.terminate()
            p.wait(10)


def _predict_200s(metrics) -> float:
    return sum(s.value for m in metrics for s in m.samples
               if s.name == "server_requests_total" and s.labels == {"endpoint": "/predict", "status": "200"})
