"""SIGTERM drains `python -m server` (a real process): readiness turns 503 at once, the requests in
flight when the signal arrives are all answered 200, then the process exits 0. Embedded mode under
granian and werkzeug (requests kept in flight by large images that take ~1 s each to decode), and
the Redis front with a fake worker in this test that answers only after the signal."""
from __future__ import annotations

import http.client
import io
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from server.redisq import GROUP, Keys, decode_job, encode_reply, manifest_checksum
from server_fixtures import digits_bundle, redis_proc, redis_url  # noqa: F401
from test_server_process import _start

pytestmark = pytest.mark.slow
IN_FLIGHT = 3


def _slow_png() -> bytes:
    """6000x6000 black PNG: 100 KB to send, ~1 s of decoding and resizing on the server."""
    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000)).save(buf, "PNG")
    return buf.getvalue()


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def _in_flight(port: int) -> float:
    text = _get(port, "/metrics")[1]
    return float(next(ln for ln in text.splitlines() if ln.startswith("server_requests_in_flight ")).split()[1])


def _post_in_threads(port: int, body: bytes, n: int) -> tuple[list, list[threading.Thread]]:
    statuses: list = []

    def post():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
            r = conn.getresponse()
            statuses.append((r.status, r.read()[:300]))
        except OSError as exc:   # a request cut by the shutdown
            statuses.append((None, repr(exc)))
        finally:
            conn.close()

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    return statuses, threads


def _sigterm_and_check_drain(proc, port: int, statuses: list, threads: list, answer=None) -> None:
    deadline = time.time() + 30
    while _in_flight(port) < IN_FLIGHT:
        assert time.time() < deadline and not statuses, f"requests not in flight: {statuses}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 5
    while (status := _get(port, "/v2/health/ready"))[0] != 503:   # at once: long before the requests end
        assert time.time() < deadline, f"readiness stayed {status} after SIGTERM"
        time.sleep(0.05)
    assert "draining" in status[1]
    if answer is not None:   # the jobs wait in Redis: the front must still be there, holding them
        time.sleep(1.5)
        assert proc.poll() is None, f"the front exited ({proc.returncode}) with requests in flight"
        assert _get(port, "/v2/health/ready")[0] == 503
        answer()
    for t in threads:
        t.join(60)
    assert [s for s, _ in statuses] == [200] * IN_FLIGHT, statuses
    try:
        code = proc.wait(30)
    except Exception:
        proc.kill()
        raise
    assert code == 0, proc.stdout.read()[-3000:]


@pytest.mark.parametrize("front", ["granian", "werkzeug"])
def test_sigterm_drains_the_embedded_server(digits_bundle, front):
    proc, url = _start("--bundle", str(digits_bundle), "--http", front, "--drain-timeout", "60")
    port = int(url.rsplit(":", 1)[1])
    try:
        statuses, threads = _post_in_threads(port, _slow_png(), IN_FLIGHT)
        _sigterm_and_check_drain(proc, port, statuses, threads)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_drains_the_redis_front(redis_url, digits_bundle):
    """The worker is this test: it heartbeats (so the front is ready), holds the jobs it reads until
    the front is draining, then answers them all."""
    import redis

    keys, model, checksum = Keys(), "digits", manifest_checksum(digits_bundle)   # keys are per bundle
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(keys.jobs(model, checksum), GROUP, id="0", mkstream=True)
    stop, release = threading.Event(), threading.Event()

    def fake_worker():
        held = []
        while not stop.is_set():
            r.zadd(keys.workers(model, checksum), {"fake": time.time()})
            got = r.xreadgroup(GROUP, "fake", {keys.jobs(model, checksum): ">"}, count=10, block=100)
            held += got[0][1] if got else []
            if release.is_set():
                for eid, fields in held:
                    job, reply = decode_job(model, fields)
                    probs = np.full((job.n_images, 10), 0.1, np.float32)
                    r.rpush(reply, encode_reply({"batch_rows": job.rows, "queue_s": 0.0, "infer_s": 0.0}, probs))
                    r.xack(keys.jobs(model, checksum), GROUP, eid)
                held = []

    worker = threading.Thread(target=fake_worker, daemon=True)
    worker.start()
    proc, url = _start("--bundle", str(digits_bundle), "--redis-url", redis_url, "--drain-timeout", "60")
    port = int(url.rsplit(":", 1)[1])
    try:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, "PNG")
        statuses, threads = _post_in_threads(port, buf.getvalue(), IN_FLIGHT)
        _sigterm_and_check_drain(proc, port, statuses, threads, answer=release.set)
    finally:
        stop.set()
        worker.join(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
