"""`python -m server` as users run it: the granian front (default) and --http werkzeug, in a
subprocess on a free loopback port; correct answers, HTTP limits through granian, clean shutdown,
and bad bundles refused with exit code 2 whether found before or after granian forks its worker."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from export import load_bundle
from server.client import Client, ServerError
from server_fixtures import digit_images, digits_bundle, free_port  # noqa: F401

pytestmark = pytest.mark.slow


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")]))


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--threads", "1",
                             "--log-level", "WARNING", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    c, deadline = Client(url, timeout=5), time.time() + 90
    while not c.ready():
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, "server did not become ready"
        time.sleep(0.2)
    return proc, url


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("server did not stop within 20 s of SIGTERM")


@pytest.mark.parametrize("front", ["granian", "werkzeug"])
def test_served_answers_equal_the_bundle_loader(digits_bundle, tiny_digits, front):
    proc, url = _start("--bundle", str(digits_bundle), "--http", front, "--max-request-bytes", "200000")
    try:
        ref = load_bundle(digits_bundle, threads=1)
        files = digit_images(tiny_digits, 3)
        out = Client(url, timeout=20).predict(files, topk=len(ref.classes))
        want = ref.predict(files).probs
        for i, p in enumerate(out["predictions"]):
            got = np.zeros(len(ref.classes))
            got[p["indices"]] = p["probabilities"]
            np.testing.assert_allclose(got, want[i], rtol=1e-4, atol=1e-5)
        # limits and errors come through the HTTP server unchanged: JSON, the right status. (An
        # oversized body is answered before it is read, so a client that writes the whole body
        # first may see the connection close: the Client reads the 413 all the same.)
        with pytest.raises(ServerError) as exc:
            Client(url, timeout=20).predict([b"\xff\xd8" + b"x" * 300_000])
        assert exc.value.status == 413 and "--max-request-bytes" in str(exc.value)
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=20)
        for body, ctype, status in ((b"not an image", "image/png", 415), (b"", "image/png", 400),
                                    (b"{}", "text/plain", 415)):
            conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
            r = conn.getresponse()
            err = json.loads(r.read())
            assert r.status == status and err["status"] == status and err["error"], (status, err)
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=20)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().status == 200
    finally:
        code = _stop(proc)
    assert code == 0, code   # SIGTERM drains, then exits 0 (tests/server/test_server_drain.py)


def test_missing_bundle_exits_2_before_serving():
    r = subprocess.run([sys.executable, "-m", "server", "--bundle", "/nonexistent/bundle", "--port", str(free_port())],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "manifest.json not found" in r.stderr


def test_tampered_model_exits_2_from_the_granian_worker(digits_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(digits_bundle, bad)
    onnx = bad / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])   # the manifest reads fine; loading the model does not
    r = subprocess.run([sys.executable, "-m", "server", "--bundle", str(bad), "--port", str(free_port()),
                        "--log-level", "WARNING"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=90)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "model.onnx" in r.stderr and "differs from the manifest" in r.stderr
