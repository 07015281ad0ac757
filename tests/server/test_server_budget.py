"""The process-wide decode memory budget (server.budget): admission in order, waiting within the
deadline then 503 + Retry-After, 413 for a request bigger than the budget, on every route in
embedded and Redis mode (the front refuses before anything is queued, so Redis mode needs no
worker), the metrics and GET /models, and decode_cost against the decoder's measured peak."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from server.app import create_app
from server.budget import DecodeBudget, MiB, decode_cost
from server.config import ServerConfig
from server.errors import APIError
from server.limits import Deadline
from server.redisq import Keys, bundle_checksum
from server_fixtures import make_fake_model, png_bytes, redis_proc, redis_url  # noqa: F401

ROUTES = ("raw", "multipart", "json", "kserve")


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    """Poll until a state is reached (a bound, not a timing: fails only if it never is)."""
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, f"never reached: {what}"
        time.sleep(0.005)


class Requester(threading.Thread):
    """acquire() in a thread; .error is the APIError it got (None: admitted and holding)."""

    def __init__(self, budget: DecodeBudget, nbytes: int, timeout_s: float = 60.0, order: list | None = None):
        super().__init__(daemon=True)
        self.budget, self.nbytes, self.timeout_s, self.order = budget, nbytes, timeout_s, order
        self.error: APIError | None = None
        self.admitted = threading.Event()

    def run(self) -> None:
        try:
            self.budget.acquire(self.nbytes, 0, Deadline(self.timeout_s))
        except APIError as exc:
            self.error = exc
            return
        if self.order is not None:
            self.order.append(self.nbytes)
        self.admitted.set()


def test_a_request_bigger_than_the_whole_budget_is_413_naming_the_flag():
    budget = DecodeBudget(100 * MiB)
    with pytest.raises(APIError) as exc:
        budget.acquire(101 * MiB, 0, Deadline(10))
    assert exc.value.status == 413 and "--max-decode-memory" in exc.value.message
    assert budget.refused_too_large == 1 and budget.in_flight == 0


def test_waiters_are_admitted_first_come_first_served_when_memory_is_released():
    budget = DecodeBudget(100)
    budget.acquire(80, 0, Deadline(60))
    order: list[int] = []
    big = Requester(budget, 50, order=order)
    big.start()
    wait_for(lambda: budget.waiting == 1, "the 50-byte request waits")
    small = Requester(budget, 10, order=order)   # would fit now (80 + 10), but the 50 came first
    small.start()
    wait_for(lambda: budget.waiting == 2, "the 10-byte request waits behind it")
    assert not small.admitted.is_set()
    budget.release(80, 0, 0.0)
    big.join(30)
    small.join(30)
    assert order == [50, 10] and big.error is None and small.error is None
    assert budget.in_flight == 60 and budget.waits == 2 and budget.waiting == 0


def test_a_waiter_gets_503_with_retry_after_when_its_deadline_comes_and_the_next_one_goes_on():
    budget = DecodeBudget(100)
    budget.acquire(80, 0, Deadline(60))
    doomed = Requester(budget, 50, timeout_s=0.2)
    doomed.start()
    doomed.join(30)
    assert doomed.error is not None and doomed.error.status == 503
    assert doomed.error.retry_after >= 1 and "--max-decode-memory" in doomed.error.message
    assert budget.refused_busy == 1 and budget.waiting == 0 and budget.waiting_bytes == 0
    after = Requester(budget, 20)   # the refused ticket left the queue: this one fits at once
    after.start()
    after.join(30)
    assert after.admitted.is_set() and budget.in_flight == 100


def test_more_than_one_budget_waiting_is_refused_at_once():
    budget = DecodeBudget(100)
    budget.acquire(80, 0, Deadline(60))
    waiter = Requester(budget, 60)
    waiter.start()
    wait_for(lambda: budget.waiting_bytes == 60, "the first request waits")
    late = Requester(budget, 50)   # 60 + 50 waiting > 100: refused without waiting for its 60 s
    late.start()
    late.join(30)
    assert late.error is not None and late.error.status == 503 and "already waiting" in late.error.message
    budget.release(80, 0, 0.0)
    waiter.join(30)
    assert waiter.admitted.is_set()


def test_a_waiter_whose_deadline_cannot_cover_its_decoding_is_refused_early():
    budget = DecodeBudget(100 * MiB)
    budget.acquire(32 * MiB, 0, Deadline(60))
    budget.release(32 * MiB, 0, 4.0)   # lately 4 s for 32 MiB
    budget.acquire(80 * MiB, 0, Deadline(60))
    short = Requester(budget, 32 * MiB, timeout_s=5.0)   # 1.5 x 4 s > 5 s: refused at once
    short.start()
    short.join(30)
    assert short.error is not None and short.error.status == 503 and short.error.retry_after >= 4


def test_the_end_of_a_large_burst_calls_on_idle_once():
    calls = []
    budget = DecodeBudget(1000, on_idle=lambda: calls.append(1), idle_after=100)
    for _ in range(3):   # small requests never arm it
        budget.acquire(50, 0, Deadline(10))
        budget.release(50, 0, 0.0)
    assert calls == []
    budget.acquire(80, 0, Deadline(10))
    budget.acquire(80, 0, Deadline(10))
    budget.release(80, 0, 0.0)
    assert calls == []   # still decoding
    budget.release(80, 0, 0.0)
    assert calls == [1]


# -- every route, both modes ---------------------------------------------------------------------
@pytest.fixture(params=["embedded", "redis"])
def serve(request):
    """serve(**config) -> (Flask test client, the service, model rows predicted, jobs queued in Redis)."""
    def make(**cfg):
        calls: list[int] = []
        model = make_fake_model(calls=calls)
        if request.param == "redis":
            app = create_app(ServerConfig(redis_url=request.getfixturevalue("redis_url"), **cfg), models=[model])
            disp = app.extensions["inference"].dispatcher
            request.addfinalizer(disp.close)
            queued = lambda: int(disp.client.xlen(Keys("srv").jobs("fake", bundle_checksum(model))))   # noqa: E731
        else:
            app = create_app(ServerConfig(**cfg), models=[model])
            queued = lambda: 0   # noqa: E731
        return app.test_client(), app.extensions["inference"], calls, queued
    return make


def post(client, route: str, image: bytes):
    """One image on a route -> the response."""
    if route == "raw":   # answered by the fast path (server.fastpath), before Flask
        return client.post("/predict", data=image, content_type="image/png")
    if route == "multipart":
        return client.post("/predict", data={"file": (io.BytesIO(image), "a.png")}, content_type="multipart/form-data")
    if route == "json":
        return client.post("/predict", json={"images": [base64.b64encode(image).decode()]})
    return client.post("/v2/models/fake/infer", json={"inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]})


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_waits_for_the_budget_then_answers_503_with_retry_after(serve, route):
    client, svc, calls, queued = serve(timeout_s=0.3)
    svc.budget.acquire(svc.budget.capacity, 0, Deadline(60))   # everything in use by someone else
    r = post(client, route, png_bytes())
    assert r.status_code == 503 and "--max-decode-memory" in r.get_json()["error"]
    assert int(r.headers["Retry-After"]) >= 1
    assert calls == [] and queued() == 0 and svc.budget.refused_busy == 1


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_answers_413_for_a_request_bigger_than_the_budget(serve, route):
    client, svc, calls, queued = serve(max_decode_memory=64 * 1024)
    r = post(client, route, png_bytes(size=(200, 200)))   # 40,000 px x 10 B: ~400 kB to decode
    assert r.status_code == 413 and "--max-decode-memory" in r.get_json()["error"]
    assert calls == [] and queued() == 0
    assert post(client, route, png_bytes()).status_code in (200, 503)   # a 40x36 image fits (503: no Redis worker)


def test_an_admitted_request_gives_its_memory_back_and_metrics_and_models_show_the_budget():
    app = create_app(ServerConfig(max_decode_memory=512 * MiB), models=[make_fake_model()])
    client, svc = app.test_client(), app.extensions["inference"]
    assert post(client, "raw", png_bytes()).status_code == 200
    assert post(client, "json", png_bytes()[:60]).status_code == 422   # cut short: fails while decoding
    assert svc.budget.in_flight == 0 and svc.budget.pixels_in_flight == 0
    text = client.get("/metrics").get_data(as_text=True)
    assert "server_decode_memory_limit_bytes 5.36870912e+08" in text
    for line in ("server_decode_memory_in_flight_bytes 0.0", "server_decode_pixels_in_flight 0.0",
                 "server_decode_memory_waits_total 0.0", 'server_decode_memory_refusals_total{reason="busy"} 0.0',
                 'server_decode_memory_refusals_total{reason="too_large"} 0.0', "server_memory_trims_total 0.0"):
        assert line in text, line
    described = client.get("/models").get_json()["decode_memory"]
    assert described["limit_bytes"] == 512 * MiB and described["limit_from"] == "--max-decode-memory"


def test_the_default_budget_is_a_quarter_of_the_memory_limit(monkeypatch):
    import server.service as service
    monkeypatch.setattr(service, "memory_limit", lambda: (4 << 30, "cgroup v2 /sys/fs/cgroup/memory.max"))
    budget = service.decode_budget(ServerConfig())
    assert budget.capacity == 1 << 30 and "cgroup v2 /sys/fs/cgroup/memory.max" in budget.source


# -- the estimate against the decoder's real peak ------------------------------------------------
PEAK_SCRIPT = r"""
import dataclasses, io, json, sys
import numpy as np
from PIL import Image
from trainer.data.transforms import PreprocessSpec
from trainer.tta import parse_policy
from server.budget import decode_cost
from server.memory import keep_freed_memory, malloc_trim
from server.preprocess import DecodeLimits, decode_to_views, sniff

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

keep_freed_memory()   # the server's malloc settings: freed blocks stay resident, as they do there
side = 2000
limits = DecodeLimits(max_pixels=10**9)
grad = (np.arange(side * side, dtype=np.uint32).reshape(side, side) % 251).astype(np.uint8)
cases = {
    "RGB PNG": Image.fromarray(np.dstack([grad, grad.T, 255 - grad])), "L PNG": Image.fromarray(grad),
    "P PNG": Image.fromarray(np.dstack([grad, grad.T, grad])).quantize(64),
    "RGBA PNG": Image.fromarray(np.dstack([grad, grad.T, grad, grad])),
    "I;16 PNG": Image.fromarray(grad.astype(np.uint16) * 200),
    "RGB JPEG": Image.fromarray(np.dstack([grad, grad.T, 255 - grad])),
    "CMYK JPEG": Image.fromarray(np.dstack([grad, grad.T, grad, grad]), "CMYK"),
}
SWEPT = ("RGB PNG", "RGB JPEG", "RGBA PNG", "I;16 PNG")
out = {}
for name, img in cases.items():
    buf = io.BytesIO()
    img.save(buf, format=name.split()[1])
    data = buf.getvalue()
    # TTA and the float32 kernel (bundles exported before the uint8 kernel) on the commonest and the
    # costliest modes
    combos = [("none", "uint8")] + ([("hflip", "uint8"), ("hflip", "float32")] if name in SWEPT else [])
    for policy, kernel in combos:
        views = parse_policy(policy)
        spec = dataclasses.replace(PreprocessSpec.for_size(32, crop_pct=1.0), resize_kernel=kernel)
        h = sniff(data, name, limits)
        decode_to_views(data, name, spec, views, limits, h.format)   # warm: first-use allocations
        peaks = []
        # the least of three: the decoder's own peak; what else moves RSS in between (a page of this
        # process reclaimed and faulted back, the allocator's placement) only adds to it (one clean
        # clone read 69.1 MiB for "P PNG", which reads 57.5-59.3 MiB run after run). VmHWM also counts
        # file-backed pages: library pages the kernel reclaimed under memory pressure and the decode
        # faulted back in (68.8 MiB read beside another job) are taken out, as RssFile's growth.
        for _ in range(3):
            malloc_trim()
            base, file_base = status("VmRSS"), status("RssFile")
            open("/proc/self/clear_refs", "w").write("5")   # VmHWM := VmRSS
            decode_to_views(data, name, spec, views, limits, h.format)
            peaks.append(status("VmHWM") - base - max(0, status("RssFile") - file_base))
        cost = decode_cost([(h.format, h.mode, h.width, h.height)], spec, views)
        out[f"{name} {policy} {kernel}"] = [min(peaks), max(peaks), cost]
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_decode_cost_covers_the_measured_peak_of_every_mode():
    env_path = f"{REPO / 'python'}:{REPO}"
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": env_path, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    for case, (least, most, cost) in json.loads(r.stdout).items():
        # peak RSS growth of decoding one 4-megapixel image (least and most of three) vs the estimate reserved for it
        assert least <= cost, f"{case}: decoding peaked {least / MiB:.1f} MiB above the {cost / MiB:.1f} MiB reserved"
        assert cost <= 4 * max(most, 4 * MiB), f"{case}: {cost / MiB:.1f} MiB reserved, {most / MiB:.1f} MiB peak"
