"""HTTP API in embedded mode with a fake model: inputs, options, errors, metrics, KServe v2."""
from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest

from server.app import create_app
from server.config import ServerConfig
from server_fixtures import make_fake_model, png_bytes
from trainer.data.images import decode_image
from trainer.tta import apply_views, merge_probs, parse_policy

import torch


@pytest.fixture(scope="module")
def fake():
    return make_fake_model()


@pytest.fixture(scope="module")
def app(fake):
    app = create_app(ServerConfig(max_request_bytes=200_000, max_images=4, max_delay_ms=2), models=[fake])
    yield app
    app.extensions["inference"].dispatcher.close()


@pytest.fixture
def client(app):
    return app.test_client()


def expected(fake, data: bytes, tta: str = "none") -> np.ndarray:
    views = apply_views(decode_image(data), fake.spec, parse_policy(tta)).numpy()
    return merge_probs(torch.from_numpy(fake.predict(views))[:, None], "mean").numpy()[0]


def full_probs(pred: dict, k: int) -> np.ndarray:
    out = np.zeros(k, np.float32)
    out[pred["indices"]] = pred["probabilities"]
    return out


def test_multipart_raw_and_json_give_the_same_correct_answer(client, fake):
    data = png_bytes(seed=5)
    want = expected(fake, data)
    answers = [
        client.post("/predict", data={"file": (io.BytesIO(data), "a.png")}, content_type="multipart/form-data"),
        client.post("/predict", data=data, content_type="image/png"),
        client.post("/predict", json={"images": [base64.b64encode(data).decode()]}),
    ]
    for r in answers:
        assert r.status_code == 200, r.get_json()
        body = r.get_json()
        assert body["model"] == "fake" and body["version"] == "test" and body["tta"] == "none"
        np.testing.assert_allclose(full_probs(body["predictions"][0], 3), want, rtol=1e-4, atol=1e-5)
        assert body["predictions"][0]["labels"][0] == f"c{int(want.argmax())}"
        assert set(body["timings_ms"]) == {"decode", "queue", "inference", "total"}


def test_many_images_topk_and_tta(client, fake):
    imgs = [png_bytes(seed=s) for s in range(3)]
    r = client.post("/predict", data={"file": [(io.BytesIO(d), f"{i}.png") for i, d in enumerate(imgs)],
                                      "topk": "2", "tta": "hflip"}, content_type="multipart/form-data")
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["tta"] == "hflip" and [p["file"] for p in body["predictions"]] == ["0.png", "1.png", "2.png"]
    for d, p in zip(imgs, body["predictions"]):
        assert len(p["labels"]) == 2
        want = expected(fake, d, "hflip")
        np.testing.assert_allclose(p["probabilities"], np.sort(want)[::-1][:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,status,words", [
    (dict(data=b"", content_type="image/png"), 400, "empty"),
    (dict(data=png_bytes()[:80], content_type="image/png"), 422, "truncated"),
    (dict(data=b"just text", content_type="image/jpeg"), 415, "not a recognised image"),
    (dict(data=b"x=1", content_type="application/x-www-form-urlencoded"), 415, "Content-Type"),
    (dict(data=b"{not json", content_type="application/json"), 400, "JSON"),
    (dict(json={"images": ["***"]}), 400, "base64"),
    (dict(json={"images": "abc"}), 400, "list"),
    (dict(data={"nofile": "1"}, content_type="multipart/form-data"), 400, "file field"),
    (dict(data=png_bytes(), content_type="image/png", query_string={"model": "nope"}), 404, "unknown model"),
    (dict(data=png_bytes(), content_type="image/png", query_string={"tta": "sideways"}), 422, "TTA"),
    (dict(data=png_bytes(), content_type="image/png", query_string={"topk": "many"}), 400, "topk"),
    (dict(data=b"\0" * 300_000, content_type="image/png"), 413, "too large"),
    (dict(json={"images": [base64.b64encode(png_bytes()).decode()] * 5}), 413, "--max-images"),
])
def test_client_mistakes_get_json_4xx_and_the_server_stays_healthy(client, kwargs, status, words):
    r = client.post("/predict", **kwargs)
    body = r.get_json()
    assert r.status_code == status, body
    assert body["status"] == status and words.lower() in body["error"].lower()
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/predict", data=png_bytes(), content_type="image/png").status_code == 200


def test_wrong_method_and_unknown_route_are_json(client):
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.get_json()
    assert client.get("/nothing-here").get_json()["status"] == 404


def test_metrics_count_requests_by_status_and_batches(client):
    client.post("/predict", data=png_bytes(), content_type="image/png")
    client.post("/predict", data=b"", content_type="image/png")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'server_requests_total{endpoint="/predict",status="200"}' in text
    assert 'server_requests_total{endpoint="/predict",status="400"}' in text
    assert 'server_batch_size_bucket{le="1.0",model="fake"}' in text
    assert 'server_queue_depth{model="fake"} 0.0' in text
    assert "server_inference_seconds_count" in text and "server_queue_seconds_count" in text


def test_page_and_models(client):
    r = client.get("/")
    assert r.status_code == 200 and b"<title>Image classifier</title>" in r.data
    assert client.get("/models").get_json()["models"][0]["name"] == "fake"


# -- KServe v2 -------------------------------------------------------------------------------
def test_kserve_health_and_metadata(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/fake/ready").status_code == 200
    meta = client.get("/v2/models/fake").get_json()
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"][0]["shape"] == [-1, 3] and meta["parameters"]["classes"] == ["c0", "c1", "c2"]
    assert client.get("/v2/models/nope").status_code == 404


def test_kserve_infer_uint8_json_and_binary(client, fake):
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    want = fake.predict(x)
    r = client.post("/v2/models/fake/infer", json={"id": "7", "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [2, 3, 32, 32], "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.get_json()
    out = r.get_json()
    assert out["id"] == "7" and out["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(2, 3), want, rtol=1e-4, atol=1e-5)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 3, 32, 32],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/fake/infer", data=head + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head))}, content_type="application/octet-stream")
    assert r.status_code == 200
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.data[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_allclose(np.frombuffer(r.data[n:], np.float32).reshape(2, 3), want, rtol=1e-4, atol=1e-5)


def test_kserve_infer_bytes_of_encoded_images(client, fake):
    imgs = [png_bytes(seed=1), png_bytes(seed=2)]
    raw = b"".join(struct.pack("<I", len(d)) + d for d in imgs)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    r = client.post("/v2/models/fake/infer", data=head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.get_json()
    got = np.array(r.get_json()["outputs"][0]["data"]).reshape(2, 3)
    np.testing.assert_allclose(got, [expected(fake, d) for d in imgs], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inp,words", [
    ({"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}, "datatype"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 3, 16, 16], "data": [0] * 768}, "shape"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 10}, "values for shape"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [300] * 3072}, "0..255"),
    ({"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [0]}, "unknown input"),
    ({"name": "images", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}, "not a recognised image"),
    ({"name": "images", "datatype": "UINT8", "shape": "1x3", "data": []}, "shape"),
])
def test_kserve_bad_tensors_are_4xx(client, inp, words):
    r = client.post("/v2/models/fake/infer", json={"inputs": [inp]})
    assert 400 <= r.status_code < 500 and words in r.get_json()["error"], r.get_json()
    assert client.post("/v2/models/fake/infer", data=b"{oops", content_type="application/json").status_code == 400
    assert client.get("/v2/health/ready").status_code == 200


def test_phone_photos_are_answered_and_a_many_scan_jpeg_is_refused(client, fake):
    """An MPO (what phone cameras write; a 415 before issue 20) on every input path; a JPEG with
    1,000 scans (the most this app's 200 KB body limit lets through) is a 422 naming the scan limit."""
    from native.decode_cases import many_scans_jpeg, mpo_jpeg

    data = mpo_jpeg()
    want = expected(fake, data)
    for r in (client.post("/predict", data=data, content_type="image/jpeg"),
              client.post("/predict", data={"file": (io.BytesIO(data), "phone.jpg")}, content_type="multipart/form-data"),
              client.post("/predict", json={"images": [base64.b64encode(data).decode()]})):
        assert r.status_code == 200, r.get_json()
        np.testing.assert_allclose(full_probs(r.get_json()["predictions"][0], 3), want, rtol=1e-4, atol=1e-5)
    r = client.post("/predict", data=many_scans_jpeg(1000), content_type="image/jpeg")
    assert r.status_code == 422 and "more than 500 scans" in r.get_json()["error"]


# -- probes, keys, versions, flags ------------------------------------------------------------
KEYS = ("key-one-aaaa", "key-two-bbbb")


class ProbeDispatcher:
    """Readiness as a Redis front reports it: reasons that name the Redis host."""

    def __init__(self, ok: bool):
        self.ok = ok

    def ready(self, model):
        return self.ok, "2 worker(s)" if self.ok else "Redis at redis://db.internal:6379/0 is unreachable (TimeoutError)"

    def depth(self, model):
        return 0

    solo_batches = depth

    def close(self):
        pass


@pytest.mark.parametrize("ok", [True, False])
def test_readiness_shows_only_a_status_to_a_caller_without_a_key(fake, ok):
    """Before: model names and the Redis host to anyone (readiness is open to probes)."""
    app = create_app(ServerConfig(api_keys=KEYS), models=[fake], dispatcher=ProbeDispatcher(ok))
    c = app.test_client()
    for headers in ({}, {"X-API-Key": "wrong-key-xxxx"}):
        r = c.get("/v2/health/ready", headers=headers)
        text = r.get_data(as_text=True)
        assert r.status_code == (200 if ok else 503) and r.get_json()["ready"] is ok
        assert set(r.get_json()) == {"ready", "reason"}
        assert "fake" not in text and "db.internal" not in text and "worker" not in text, text
    for headers in ({"X-API-Key": KEYS[1]}, {"Authorization": f"Bearer {KEYS[0]}"}):
        r = c.get("/v2/health/ready", headers=headers)   # authorized: the details
        assert r.get_json()["models"]["fake"]["ready"] is ok and r.status_code == (200 if ok else 503)
        assert ("2 worker(s)" if ok else "db.internal") in r.get_json()["models"]["fake"]["reason"]
    assert c.get("/v2/models/fake/ready").status_code == 401   # the per-model route is behind the key
    r = c.get("/v2/models/fake/ready", headers={"X-API-Key": KEYS[0]})
    assert r.get_json()["ready"] is ok and r.get_json()["reason"]
    # no keys configured: every caller is authorized, as for every other route
    open_app = create_app(ServerConfig(), models=[fake], dispatcher=ProbeDispatcher(ok))
    assert "fake" in open_app.test_client().get("/v2/health/ready").get_json()["models"]


def test_api_keys_are_compared_as_fixed_length_digests(fake, monkeypatch):
    """hmac.compare_digest returns early on inputs of unequal length: the time would tell a caller
    the keys' length. Before: the key sent was compared as it came (1, 12, 300 bytes)."""
    import server.front
    seen = []
    real = server.front.hmac.compare_digest
    monkeypatch.setattr(server.front.hmac, "compare_digest", lambda a, b: (seen.append((len(a), len(b))), real(a, b))[1])
    c = create_app(ServerConfig(api_keys=KEYS), models=[fake]).test_client()
    for key, status in (("k", 401), ("x" * 300, 401), (KEYS[0][:-1], 401), (KEYS[0], 200), (KEYS[1], 200)):
        assert c.get("/models", headers={"X-API-Key": key}).status_code == status, key
    assert len(seen) == 5 * len(KEYS) and set(seen) == {(32, 32)}, seen


def test_healthz_is_a_liveness_route_open_without_a_key(fake):
    """Before: /healthz was an open path with no route (404)."""
    c = create_app(ServerConfig(api_keys=KEYS), models=[fake], dispatcher=ProbeDispatcher(False)).test_client()
    for path in ("/healthz", "/v2/health/live"):
        r = c.get(path)
        assert r.status_code == 200 and r.get_json() == {"live": True}, path   # live even while not ready


def test_kserve_versions_answer_only_the_loaded_version(client, fake):
    """Before: /versions/V was ignored (any V served the loaded model)."""
    x = np.zeros((1, 3, 32, 32), np.uint8)
    infer = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": x.reshape(-1).tolist()}]}
    assert fake.version == "test"
    for version, status in (("test", 200), ("1", 404), ("test2", 404), ("TEST", 404)):
        prefix = f"/v2/models/fake/versions/{version}"
        answers = (client.get(prefix), client.get(prefix + "/ready"), client.post(prefix + "/infer", json=infer))
        for r in answers:
            assert r.status_code == status, (version, r.get_json())
            if status == 404:
                assert "no version" in r.get_json()["error"] and "'test'" in r.get_json()["error"]
    assert client.get("/v2/models/fake/versions/test").get_json()["versions"] == ["test"]


NUMERIC_FLAGS_OUT_OF_RANGE = [
    ("--port", "0"), ("--port", "70000"), ("--threads", "0"), ("--runners", "0"), ("--solo-threads", "-1"),
    ("--max-batch", "0"), ("--max-delay-ms", "-1"), ("--max-delay-ms", "nan"), ("--max-delay-ms", "20000"),
    ("--max-queue", "0"), ("--max-queue-rows", "0"), ("--timeout-s", "0"), ("--timeout-s", "-5"),
    ("--timeout-s", "nan"), ("--timeout-s", "inf"), ("--max-request-bytes", "0"), ("--max-pixels", "0"),
    ("--max-images", "0"), ("--max-tta-views", "0"), ("--max-tta-scale", "0.5"), ("--max-tta-scale", "inf"),
    ("--max-request-pixels", "-1"), ("--http-threads", "0"), ("--drain-timeout", "-1"),
    ("--drain-timeout", "nan"), ("--reply-ttl-s", "0"), ("--reply-ttl-s", "-60"),
]


@pytest.mark.parametrize("flag, value", NUMERIC_FLAGS_OUT_OF_RANGE)
def test_every_numeric_flag_is_range_checked_at_start_up(flag, value, capsys):
    """python -m server exits 2 with a message naming the flag, before reading any bundle.
    Before: --reply-ttl-s 0, zero byte and pixel limits, a port over 65535, nan and inf (which pass
    every comparison) were accepted."""
    from server.__main__ import main
    assert main(["--bundle", "/nonexistent/bundle", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}" in err and "manifest.json" not in err, err


def test_the_range_table_covers_every_numeric_flag():
    """A numeric flag added to python -m server without a range check fails here."""
    from server.__main__ import build_parser
    numeric = {opt for a in build_parser()._actions if a.type in (int, float) for opt in a.option_strings}
    assert numeric == {flag for flag, _ in NUMERIC_FLAGS_OUT_OF_RANGE}
