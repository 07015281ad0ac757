"""End to end with a real bundle: the server's probabilities equal export.load_bundle's, in embedded
and Redis mode, for single models and ensembles, through /predict, the Python client, the CLI and
NVIDIA's tritonclient."""
from __future__ import annotations

import io
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from export import load_bundle
from server.app import create_app
from server.client import Client
from server.config import ServerConfig
from server_fixtures import (LiveServer, digit_images, digits_bundle, ensemble_bundle, free_port, redis_proc,  # noqa: F401
                             redis_url, start_worker, wait_ready)

pytestmark = pytest.mark.slow


def as_full(pred: dict, k: int) -> np.ndarray:
    out = np.zeros(k, np.float32)
    out[pred["indices"]] = pred["probabilities"]
    return out


def jpeg_of(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((45, 37)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def embedded(digits_bundle, ensemble_bundle):
    # onnxruntime pinned: runners=2 with its solo session is an onnxruntime layout, and on auto the start-up
    # chooser, which times the candidates, may pick OpenVINO on a busy machine (it did, in a clean-clone run)
    app = create_app(ServerConfig(bundles=[str(digits_bundle), str(ensemble_bundle)], threads=1, runners=2,
                                  max_delay_ms=2, backend="onnxruntime"))
    srv = LiveServer(app)
    yield srv
    srv.close()
    app.extensions["inference"].dispatcher.close()


@pytest.mark.parametrize("model,tta", [("digits", "none"), ("digits", "hflip"), ("digits-ens", "five-crop")])
def test_embedded_equals_bundle_loader(embedded, digits_bundle, ensemble_bundle, tiny_digits, model, tta):
    ref = load_bundle(digits_bundle if model == "digits" else ensemble_bundle, threads=1)
    files = digit_images(tiny_digits, 5)
    datas = [f.read_bytes() for f in files] + [jpeg_of(files[0])]
    out = Client(embedded.url).predict(datas, model=model, tta=tta, topk=len(ref.classes))
    want = ref.predict(datas, tta=tta, topk=len(ref.classes)).probs
    assert out["model"] == model and out["tta"] == tta
    got = np.stack([as_full(p, len(ref.classes)) for p in out["predictions"]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    one = Client(embedded.url).predict(files[0], model=model, tta=tta, topk=len(ref.classes))   # a raw body
    assert one["model"] == model and one["tta"] == tta and one["predictions"][0]["file"] == files[0].name
    np.testing.assert_allclose(as_full(one["predictions"][0], len(ref.classes)), want[0], rtol=1e-4, atol=1e-5)


def test_sequential_requests_run_on_the_solo_session(embedded, tiny_digits):
    """runners=2, threads=1: one request at a time gets the 2-thread session (answers checked above)."""
    for f in digit_images(tiny_digits, 3):
        Client(embedded.url).predict([f.read_bytes()])
    with urllib.request.urlopen(embedded.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('server_solo_batches_total{model="digits"}'))
    assert float(line.split()[-1]) >= 3


def test_cli_client_prints_top_classes(embedded, tiny_digits):
    f = digit_images(tiny_digits, 1)[0]
    r = run_cli("--url", embedded.url, str(f), "--topk", "3", module="server.client")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{f.name}: ") and "model digits" in r.stdout
    r = run_cli("--url", embedded.url, str(f), "--model", "nope", module="server.client")
    assert r.returncode == 1 and "HTTP 404" in r.stderr and "unknown model" in r.stderr


def test_tritonclient_against_the_server(embedded, digits_bundle, tiny_digits):
    import tritonclient.http as httpclient
    from trainer.data.images import decode_image
    from trainer.data.transforms import eval_transform

    ref = load_bundle(digits_bundle, threads=1)
    tc = httpclient.InferenceServerClient(embedded.url.removeprefix("http://"))
    assert tc.is_server_live() and tc.is_server_ready() and tc.is_model_ready("digits")
    meta = tc.get_model_metadata("digits")
    assert meta["inputs"][0]["datatype"] == "UINT8" and meta["parameters"]["classes"] == ref.classes
    files = digit_images(tiny_digits, 3)
    x = np.stack([eval_transform(decode_image(f), ref.spec).numpy() for f in files])
    inp = httpclient.InferInput("images", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    res = tc.infer("digits", [inp])
    np.testing.assert_allclose(res.as_numpy("probs"), ref.predict_tensor(x), rtol=1e-4, atol=1e-5)
    enc = np.array([f.read_bytes() for f in files], dtype=np.object_)
    inp = httpclient.InferInput("images", [len(files)], "BYTES")
    inp.set_data_from_numpy(enc)
    res = tc.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("probs", binary_data=False)])
    np.testing.assert_allclose(res.as_numpy("probs"), ref.predict([f.read_bytes() for f in files]).probs,
                               rtol=1e-4, atol=1e-5)
    bad = httpclient.InferInput("images", [1, 3, 8, 8], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(Exception, match="takes \\[N, 3, 32, 32\\]"):
        tc.infer("digits", [bad])
    assert tc.is_server_ready()


def test_redis_mode_two_worker_processes_equal_bundle_loader(redis_url, redis_proc, digits_bundle, tiny_digits):
    mport = free_port()
    workers = [start_worker(redis_url, digits_bundle, "--consumer", f"p{i}", *(["--metrics-port", str(mport)] if i == 0 else []))
               for i in range(2)]
    try:
        for w in workers:
            wait_ready(w)
        app = create_app(ServerConfig(bundles=[str(digits_bundle)], redis_url=redis_url))
        assert app.extensions["inference"].models.get("digits").predict is None   # the front loads no weights
        c = app.test_client()
        ref = load_bundle(digits_bundle, threads=1)
        for f in digit_images(tiny_digits, 4):
            r = c.post("/predict", data=f.read_bytes(), content_type="image/png", query_string={"topk": 99})
            assert r.status_code == 200, r.get_json()
            np.testing.assert_allclose(as_full(r.get_json()["predictions"][0], len(ref.classes)), ref.predict(f).probs[0],
                                       rtol=1e-4, atol=1e-5)
        assert c.get("/v2/health/ready").get_json()["models"]["digits"]["reason"] == "2 worker(s)"
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:   # worker's own metrics
            text = r.read().decode()
        assert "# HELP worker_batch_size" in text and "# HELP worker_dead_letters" in text
    finally:
        for w in workers:
            w.kill()
            w.wait()
