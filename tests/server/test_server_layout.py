"""The embedded server's layout chooser (server.layout): the decision rule on fake timings, the
measurement's call pattern, and a server started without tuning flags reporting its choice."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from server.__main__ import config_from_args
from server.app import create_app
from server.config import ServerConfig
from server.layout import (BackendChoice, BackendTiming, Layout, LayoutRequest, LayoutTimings, backend_candidates,
                           choose_backend, choose_layout, measure_timings, usable_cores)
from server_fixtures import digits_bundle  # noqa: F401

AUTO = LayoutRequest()


def timings(split: float, pooled: float, pooled_b1: float = 4.0, single_b1: float = 7.0) -> LayoutTimings:
    return LayoutTimings(batch=4, pooled_images_per_s=pooled, split_images_per_s=split, pooled_batch1_ms=pooled_b1,
                         single_batch1_ms=single_b1)


def values(lay: Layout) -> tuple[int, int, int, int]:
    return lay.runners, lay.threads, lay.solo_threads, lay.max_batch


def test_split_when_side_by_side_single_thread_calls_are_faster():
    lay = choose_layout(AUTO, 2, timings(split=87, pooled=73))
    assert values(lay) == (2, 1, 2, 8)
    assert lay.chosen == ("runners", "threads", "solo_threads", "max_batch") and "1.19x" in lay.reason


def test_split_within_the_margin_and_pooled_below_it():
    assert values(choose_layout(AUTO, 4, timings(split=81, pooled=100))) == (4, 1, 4, 8)
    assert values(choose_layout(AUTO, 4, timings(split=79, pooled=100))) == (1, 4, 0, 32)


def test_no_solo_session_when_every_core_is_no_faster_at_batch_1():
    lay = choose_layout(AUTO, 2, timings(split=87, pooled=73, pooled_b1=0.31, single_b1=0.25))
    assert values(lay) == (2, 1, 0, 8) and "no solo session" in lay.reason


def test_explicit_flags_win_and_the_rest_is_filled_around_them():
    assert not LayoutRequest(threads=1).needs_measurement(2) and not LayoutRequest(runners=2).needs_measurement(2)
    lay = choose_layout(LayoutRequest(threads=1, runners=2, max_batch=16), 2, timings(split=10, pooled=100))
    assert values(lay) == (2, 1, 2, 16) and lay.chosen == ("solo_threads",)
    assert values(choose_layout(LayoutRequest(runners=4), 8)) == (4, 2, 8, 32)    # threads: cores / runners
    assert values(choose_layout(LayoutRequest(threads=2), 8)) == (1, 2, 0, 32)    # --threads caps the cores
    assert values(choose_layout(LayoutRequest(solo_threads=0), 2, timings(split=87, pooled=73))) == (2, 1, 0, 8)
    assert values(choose_layout(LayoutRequest(solo_threads=3), 2, timings(split=87, pooled=73))) == (2, 1, 3, 8)


@pytest.mark.parametrize("threads,runners,solo,cpus,want", [
    (1, 2, None, 2, 2), (1, 4, None, 2, 2), (2, 2, None, 2, 0), (None, 2, None, 2, 2), (1, 1, None, 2, 0),
    (1, 2, 0, 2, 0), (1, 2, 3, 2, 3), (1, 1, 3, 2, 0)])
def test_solo_threads_with_runner_flags(threads, runners, solo, cpus, want):
    """The solo session's threads: the runners' total, at most the cores, if more than one runner's."""
    assert choose_layout(LayoutRequest(threads, runners, solo), cpus).solo_threads == want


def test_one_core_and_backends_without_concurrent_calls_get_one_runner():
    assert values(choose_layout(AUTO, 1)) == (1, 1, 0, 32)
    lay = choose_layout(AUTO, 4, concurrent_ok=False, backend="torchscript")
    assert values(lay) == (1, 4, 0, 32) and "torchscript runs one call at a time" in lay.reason
    assert values(choose_layout(LayoutRequest(runners=2, solo_threads=2), 4, concurrent_ok=False)) == (2, 4, 0, 32)
    assert values(choose_layout(AUTO, 4)) == (1, 4, 0, 32)   # nothing measured: the old default


def test_usable_cores_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5})
    assert 1 <= usable_cores() <= 3


def test_measurement_calls_each_session_with_the_right_batches_side_by_side():
    calls, lock = [], threading.Lock()

    def fake(name):
        def predict(x):
            with lock:
                calls.append((name, x.shape[0]))
            return np.zeros((x.shape[0], 3), np.float32)
        return predict

    t = measure_timings(fake("single"), fake("pooled"), (3, 8, 8), cores=3, batch=4, budget_s=0, max_rounds=2)
    assert t.batch == 4 and t.split_images_per_s > 0 and t.pooled_images_per_s > 0
    # warm-up + 2 rounds: pooled at 1 and 4, single at 1, and three single calls of 4 at a time
    assert calls.count(("pooled", 1)) == 3 and calls.count(("pooled", 4)) == 3
    assert calls.count(("single", 1)) == 3 and calls.count(("single", 4)) == 3 * 3


def test_command_line_without_tuning_flags_leaves_the_layout_to_the_server():
    cfg, _ = config_from_args(["--bundle", "b"])
    assert cfg.layout_request() == AUTO
    cfg, _ = config_from_args(["--bundle", "b", "--threads", "1", "--max-batch", "4"])
    assert cfg.layout_request() == LayoutRequest(threads=1, max_batch=4)
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        ServerConfig(bundles=["b"], threads=0).validate()


@pytest.mark.slow
def test_server_without_tuning_flags_reports_its_auto_layout(digits_bundle):
    app = create_app(ServerConfig(bundles=[str(digits_bundle)]))
    try:
        models = app.test_client().get("/models").get_json()["models"]
        lay = models[0]["layout"]
        batcher = app.extensions["inference"].dispatcher.batchers["digits"]
    finally:
        app.extensions["inference"].dispatcher.close()
    assert lay["auto"] == ["runners", "threads", "solo_threads", "max_batch"] and lay["reason"]
    assert lay["runners"] * lay["threads"] == usable_cores() or lay["runners"] == 1
    assert batcher.runners == lay["runners"] and batcher.max_batch == min(lay["max_batch"], models[0]["max_batch"])
    assert (batcher.solo is not None) == (lay["solo_threads"] > 0)
    # the backend was chosen too: both fp32 backends measured, bf16 not tried (the bundle never verified it)
    choice = lay["backend"]
    assert choice["candidates"] == ["onnxruntime/fp32", "openvino/fp32"] and choice["precision"] == "fp32"
    assert set(choice["measured"]) == set(choice["candidates"]) and "no bf16 verification" in choice["reason"]
    assert models[0]["execution"]["backend"] == choice["backend"]
    if usable_cores() > 1 and choice["backend"] == "onnxruntime":   # concurrent sessions: split vs pooled timed
        assert lay["measured"]["split_images_per_s"] > 0 and lay["measured"]["pooled_batch1_ms"] > 0


ORT, OV, OV16 = ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")


def test_backend_candidates_allow_bf16_only_verified_and_native():
    """A faked CPU record plays each machine: bf16 needs both the bundle's verification and the CPU's."""
    arts = {"onnx": {}, "torchscript": {}}
    assert backend_candidates(arts, bf16_verified=True, native_bf16=True, have_openvino=True)[0] == [ORT, OV, OV16]
    cands, why = backend_candidates(arts, bf16_verified=True, native_bf16=False, have_openvino=True)
    assert cands == [ORT, OV] and "no native bf16" in why[0]
    cands, why = backend_candidates(arts, bf16_verified=False, native_bf16=True, have_openvino=True)
    assert cands == [ORT, OV] and "no bf16 verification" in why[0]
    assert backend_candidates(arts, True, True, have_openvino=False)[0] == [ORT]
    assert backend_candidates({"torchscript": {}, "pt2": {}}, True, True, True)[0] == []


def bt(backend_precision, images_per_s, batch1_ms) -> BackendTiming:
    return BackendTiming(*backend_precision, images_per_s, batch1_ms)


def test_choose_backend_never_slower_than_onnxruntime_fp32():
    # a CPU without bf16 (no bf16 candidate): OpenVINO f32 within the margin, or faster but slower at batch 1
    assert choose_backend([bt(ORT, 100, 10), bt(OV, 105, 9)]).backend == "onnxruntime"
    assert choose_backend([bt(ORT, 100, 10), bt(OV, 150, 12)]).backend == "onnxruntime"
    assert choose_backend([bt(ORT, 100, 10), bt(OV, 80, 8)]).backend == "onnxruntime"
    won = choose_backend([bt(ORT, 100, 10), bt(OV, 115, 9)])
    assert (won.backend, won.precision) == OV and "1.15x" in won.reason
    # the resnet50 figures on a bf16 CPU: bf16 twice onnxruntime's images/s, half its batch-1 time
    won = choose_backend([bt(ORT, 13.0, 42.6), bt(OV, 12.8, 38.0), bt(OV16, 26.6, 19.7)], ["x"])
    assert (won.backend, won.precision) == OV16 and "not tried: x" in won.reason
    assert won.describe()["measured"]["openvino/bf16"] == {"images_per_s": 26.6, "batch1_ms": 19.7}


def test_a_worker_load_without_backend_flags_chooses_the_backend_too(digits_bundle, monkeypatch):
    """A Redis worker loads without a layout (one session with --threads): with --backend auto
    --precision auto it takes the same start-up choice as embedded mode; explicit flags skip it."""
    import server.models as models

    asked = []

    def fake_choice(root, trust, cores):
        asked.append(cores)
        return BackendChoice("openvino", "fp32", "faked: 1.5x onnxruntime fp32's images/s")

    monkeypatch.setattr(models, "_choose_backend", fake_choice)
    served = models.load_served_model(digits_bundle, "auto", threads=1)
    assert asked == [1] and served.backend == "openvino"
    served = models.load_served_model(digits_bundle, "onnxruntime", threads=1, precision="fp32")
    assert asked == [1] and served.backend == "onnxruntime"
