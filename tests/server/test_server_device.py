"""--device for the server and its workers, on any machine: what runs where is reported in
/v2/models/<name>, /models and /metrics (embedded: this process; Redis front: each live worker), a
device this machine cannot use is refused at start-up naming it (never a silent CPU run), and a CUDA
model gets the GPU layout. The CUDA runs themselves are in scripts/gpu_check.sh (pytest -m gpu)."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from conftest import REPO
from server.app import create_app
from server.config import ServerConfig, WorkerConfig
from server.layout import GPU_MAX_BATCH, LayoutRequest, device_layout
from server.metrics import ServerMetrics
from server.worker import ModelWorker
from server_fixtures import digits_bundle, free_port, make_fake_model, redis_proc, redis_url  # noqa: F401

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_an_embedded_model_reports_its_device_backend_and_provider(digits_bundle):
    # the backend pinned: left to auto, the start-up chooser measures the candidates and may pick OpenVINO
    # on a busy or another machine (tests/server/test_server_layout.py tests that choice)
    app = create_app(ServerConfig(bundles=[str(digits_bundle)], threads=1, runners=1, max_batch=8,
                                  backend="onnxruntime"))
    c = app.test_client()
    name = app.extensions["inference"].models.default
    want = {"device": "cpu", "backend": "onnxruntime", "provider": "CPUExecutionProvider"}
    assert c.get(f"/v2/models/{name}").get_json()["parameters"]["execution"] == {"this process": want}
    assert c.get("/models").get_json()["models"][0]["execution"] == want
    metrics = c.get("/metrics").get_data(as_text=True)
    assert (f'server_model_info{{backend="onnxruntime",device="cpu",model="{name}",'
            f'provider="CPUExecutionProvider",version=') in metrics


def test_a_redis_front_reports_how_each_live_worker_runs_the_model(redis_url):
    model = make_fake_model()
    model.backend = "onnxruntime"
    stop = threading.Event()
    worker = ModelWorker(WorkerConfig(redis_url=redis_url, consumer="gpu-box-1"), model, ServerMetrics("worker"), stop)
    worker.prepare()   # the first heartbeat carries the execution
    front = create_app(ServerConfig(redis_url=redis_url), models=[make_fake_model()]).test_client()
    info = front.get("/v2/models/fake").get_json()["parameters"]["execution"]
    assert info == {"gpu-box-1": {"device": "cpu", "backend": "onnxruntime", "provider": "CPUExecutionProvider"}}
    metrics = front.get("/metrics").get_data(as_text=True)
    assert ('server_worker_info{backend="onnxruntime",consumer="gpu-box-1",device="cpu",model="fake",'
            'provider="CPUExecutionProvider"} 1.0') in metrics
    worker.leave()
    worker.r.zrem(worker.workers_key, "gpu-box-1")      # gone: no longer reported
    assert front.get("/v2/models/fake").get_json()["parameters"]["execution"] == {}


def test_a_cuda_model_gets_one_runner_and_gpu_sized_batches():
    layout = device_layout(LayoutRequest(), "cuda:1")
    assert (layout.runners, layout.solo_threads, layout.max_batch) == (1, 0, GPU_MAX_BATCH)
    assert "cuda:1" in layout.reason
    assert device_layout(LayoutRequest(runners=2, max_batch=16), "cuda:0").max_batch == 16   # flags win


@pytest.mark.parametrize("module", ["server", "server.worker"])
def test_an_unknown_device_name_is_refused_at_start_up(digits_bundle, module):
    args = ["--redis-url", "redis://127.0.0.1:1/0"] if module == "server.worker" else \
        ["--port", str(free_port()), "--http", "werkzeug"]
    r = subprocess.run([sys.executable, "-m", module, "--bundle", str(digits_bundle), "--device", "gpu0", *args],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "unknown device 'gpu0'" in r.stderr and "cuda:N" in r.stderr


@NO_CUDA
@pytest.mark.parametrize("module", ["server", "server.worker"])
def test_a_cuda_device_on_a_machine_without_one_is_refused_never_run_on_the_cpu(digits_bundle, redis_url, module):
    args = ["--redis-url", redis_url] if module == "server.worker" else ["--port", str(free_port()), "--http",
                                                                          "werkzeug"]
    r = subprocess.run([sys.executable, "-m", module, "--bundle", str(digits_bundle), "--device", "cuda:3", *args],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "cuda:3" in r.stderr and "no CUDA device is usable here" in r.stderr
    assert "ready" not in r.stdout and "serving" not in r.stdout
