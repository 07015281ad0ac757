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


def test_kill_9_a_worker_mid_load_loses_and_duplicates_nothing(redis_url, redis_proc, digits_bundle, tiny_digits):
    def worker(name):
        return start_worker(redis_url, digits_bundle, "--consumer", name, "--claim-idle-ms", "1000", "--max-batch", "8")

    # k0 alone takes the load, so it is killed while it holds entries; k1 starts after the kill
    # and must reclaim them.
    workers = [worker("k0")]
    try:
        wait_ready(workers[0])
        app = create_app(ServerConfig(bundles=[str(digits_bundle)], redis_url=redis_url, timeout_s=30, max_queue=1000))
        ref = load_bundle(digits_bundle, threads=1)
        files = digit_images(tiny_digits, 12)
        datas = [f.read_bytes() for f in files]
        want = ref.predict(datas, topk=1).probs.argmax(1)
        n, done = 240, []
        rc = redis_proc.client()
        killed = {}
        kill_lock = threading.Lock()

        def pending_by_consumer() -> dict:
            return {(c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): c["pending"]
                    for c in rc.xinfo_consumers(Keys().jobs("digits"), GROUP)}

        def kill_k0_while_it_holds_jobs():
            # Kill at a moment k0 holds unacknowledged entries (the other 15 threads keep the load
            # going meanwhile); between two batches it briefly holds none.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pending = pending_by_consumer()
                if pending.get("k0", 0) > 0:
                    break
                time.sleep(0.002)
            os.kill(workers[0].pid, signal.SIGKILL)
            killed["pending"] = pending
            workers.append(worker("k1"))
            threading.Thread(target=wait_ready, args=(workers[1],), daemon=True).start()  # drains its output

        def one(i):
            r = app.test_client().post("/predict", data=datas[i % 12], content_type="image/png")
            done.append(i)
            if len(done) >= 40 and not killed:
                with kill_lock:
                    if not killed:
                        kill_k0_while_it_holds_jobs()
            return i, r.status_code, r.get_json()

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(n)))
        ok = [(i, body) for i, status, body in answers if status == 200]
        timeouts = [body for _, status, body in answers if status == 504]
        assert len(ok) + len(timeouts) == n, {s for _, s, _ in answers}
        assert all("deadline" in b["error"] for b in timeouts)
        assert len(ok) >= n * 0.9
        for i, body in ok:
            assert body["predictions"][0]["indices"][0] == want[i % 12]
        assert workers[0].wait(5) == -signal.SIGKILL
        assert killed["pending"].get("k0", 0) > 0                  # it died holding unacknowledged jobs...
        replied = int(rc.hget(Keys().stats("digits"), "replied"))
        assert replied == len(ok)                                   # each job answered once
        assert all(rc.llen(k) <= 1 for k in rc.keys("srv:reply:*"))
        assert rc.xpending(Keys().jobs("digits"), GROUP)["pending"] == 0   # ...which k1 reclaimed
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
