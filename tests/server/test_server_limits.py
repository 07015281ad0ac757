"""Bounded cost per request (server.limits): every limit on every route, in embedded and Redis mode
(the front refuses before anything is queued, so Redis mode needs no worker), and the embedded
queue's row limit. Also the 500s the fuzz test found, each now a 4xx."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from server.app import create_app
from server.batching import Job
from server.config import ServerConfig
from server.embedded import EmbeddedBatcher
from server.errors import APIError
from server.limits import MAX_TTA_POLICY_CHARS
from server.redisq import Keys, bundle_checksum
from server_fixtures import make_fake_model, png_bytes, redis_proc, redis_url  # noqa: F401

ROUTES = ("raw", "multipart", "json", "kserve")


@pytest.fixture(params=["embedded", "redis"])
def serve(request):
    """serve(**config) -> (test client, model rows predicted, queued-job count in Redis or None)."""
    def make(**cfg):
        calls: list[int] = []
        model = make_fake_model(calls=calls)
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            app = create_app(ServerConfig(redis_url=url, **cfg), models=[model])
            disp = app.extensions["inference"].dispatcher
            request.addfinalizer(disp.close)
            return app.test_client(), calls, lambda: int(disp.client.xlen(Keys("srv").jobs("fake", bundle_checksum(model))))
        app = create_app(ServerConfig(**cfg), models=[model])
        return app.test_client(), calls, lambda: 0
    return make


def post(client, route: str, images: list[bytes], tta=None):
    """The same request on each route -> (status, error message or None)."""
    if route == "raw":
        r = client.post("/predict", data=images[0], content_type="image/png",
                        query_string={"tta": tta} if tta is not None else {})
    elif route == "multipart":
        data = {"file": [(io.BytesIO(b), f"{i}.png") for i, b in enumerate(images)]}
        if tta is not None:
            data["tta"] = tta
        r = client.post("/predict", data=data, content_type="multipart/form-data")
    elif route == "json":
        body = {"images": [base64.b64encode(b).decode() for b in images]}
        if tta is not None:
            body["tta"] = tta
        r = client.post("/predict", json=body)
    else:
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                            "data": [base64.b64encode(b).decode() for b in images]}]}
        if tta is not None:
            body["parameters"] = {"tta": tta}
        r = client.post("/v2/models/fake/infer", json=body)
    body = r.get_json()
    return r.status_code, (body or {}).get("error")


TTA_OVER_LIMITS = [
    ("multiscale:" + ",".join(str(32 + i) for i in range(17)), 422, "--max-tta-views"),
    ("multiscale:100000", 422, "--max-tta-scale"),            # was a 500: a 40-gigapixel resize
    ("multiscale:" + "40," * 100, 422, f"limit is {MAX_TTA_POLICY_CHARS}"),
    (["hflip"], 400, "tta must be a string"),
]


# a non-string tta can only be sent in JSON (query strings and form fields are always strings)
@pytest.mark.parametrize("route, tta, status, words", [
    (route, *case) for route in ROUTES for case in TTA_OVER_LIMITS
    if isinstance(case[0], str) or route in ("json", "kserve")])
def test_tta_over_a_limit_is_a_4xx_naming_it_before_any_work(serve, route, tta, status, words):
    client, calls, queued = serve()
    got, err = post(client, route, [png_bytes()], tta)
    assert (got, words in (err or "")) == (status, True), err
    assert calls == [] and queued() == 0


@pytest.mark.parametrize("route", ROUTES)
def test_ten_crop_and_the_largest_allowed_resize_pass_on_every_route(route):
    client = create_app(ServerConfig(), models=[make_fake_model()]).test_client()
    assert post(client, route, [png_bytes()], "ten-crop") == (200, None)
    assert post(client, route, [png_bytes()], "multiscale:32,64") == (200, None)   # 64 = 2 x resize 32


@pytest.mark.parametrize("route", ROUTES)
def test_request_pixels_are_summed_from_the_headers_before_decoding(serve, route, monkeypatch):
    # 40x36 PNG: 1440 pixels decoded + 35x32 = 1120 resized at shorter side 32: 2560 per image
    decoded = []
    import server.service
    real = server.service.decode_to_views
    monkeypatch.setattr(server.service, "decode_to_views", lambda *a, **k: (decoded.append(1), real(*a, **k))[1])
    client, calls, queued = serve(max_request_pixels=5000)
    if route != "raw":   # the raw body carries one image
        status, err = post(client, route, [png_bytes(), png_bytes(seed=1)])
        assert status == 413 and "--max-request-pixels" in err and "5,120 pixels" in err, err
        assert decoded == [] and calls == [] and queued() == 0
    # a 1500x1 image passes --max-pixels but resizes to 48000x32 at shorter side 32
    status, err = post(client, route, [png_bytes(size=(1500, 1))])
    assert status == 413 and "--max-request-pixels" in err and "closer to square" in err, err
    assert decoded == [] and calls == [] and queued() == 0


@pytest.mark.parametrize("route", ROUTES)
def test_one_request_over_the_queue_rows_is_413_not_a_retry(serve, route):
    client, calls, queued = serve(max_queue_rows=8)
    status, err = post(client, route, [png_bytes()], "ten-crop")   # 1 image x 10 views
    assert status == 413 and "--max-queue-rows" in err and "10 model rows" in err, err
    assert calls == [] and queued() == 0


@pytest.mark.parametrize("route", ROUTES)
def test_the_deadline_starts_at_arrival_and_covers_decoding(serve, route, monkeypatch):
    """A fake clock that moves 6 s per decoded image: with --timeout-s 10 the third image is never
    decoded, nothing is queued, and the answer is a 504 naming --timeout-s. (The raw body holds one
    image: 11 s for it, and the check before queueing answers.)"""
    import server.limits
    import server.service
    clock = [time.time()]
    monkeypatch.setattr(server.limits, "time", SimpleNamespace(time=lambda: clock[0]))
    real, decoded = server.service.decode_to_views, []

    def slow_decode(*a, **k):
        decoded.append(1)
        clock[0] += 11 if route == "raw" else 6
        return real(*a, **k)

    monkeypatch.setattr(server.service, "decode_to_views", slow_decode)
    client, calls, queued = serve(timeout_s=10)
    n = 1 if route == "raw" else 3
    status, err = post(client, route, [png_bytes(seed=i) for i in range(n)])
    assert status == 504 and "--timeout-s" in err, err
    assert len(decoded) == min(n, 2) and calls == [] and queued() == 0


def test_the_deadline_is_the_jobs_deadline_from_arrival():
    """Job.deadline = arrival + --timeout-s, whatever decoding took (here: arrival 4 s ago)."""
    seen = []

    class Recorder:
        def infer(self, job):
            seen.append(job.deadline)
            raise APIError(503, "stop here")

        def arriving(self, model):
            return contextlib.nullcontext()

        def depth(self, model):
            return 0

        solo_batches = depth

    app = create_app(ServerConfig(timeout_s=10), models=[make_fake_model()], dispatcher=Recorder())
    svc = app.extensions["inference"]
    arrival = time.time() - 4
    with pytest.raises(APIError):
        svc.classify_images([("a", png_bytes())], arrival=arrival)
    assert seen == [arrival + 10]


def test_embedded_queue_counts_rows_queued_or_running():
    """--max-queue-rows 5: a 3-row job runs (held by the model), a second 3-row job is a 503 with
    Retry-After naming the flag, a 2-row job fits; once the first finishes its rows are free."""
    release, started = threading.Event(), threading.Event()
    model = make_fake_model()

    def held_predict(x):
        started.set()
        release.wait(30)
        return model.predict(x)

    b = EmbeddedBatcher("fake", held_predict, max_batch=8, max_delay_ms=0, max_queue_rows=5)
    try:
        def job(rows):
            px = np.zeros((rows, 3, 32, 32), np.uint8)
            return Job(model="fake", pixels=px, n_images=rows, deadline=time.time() + 30)

        results = []
        first = threading.Thread(target=lambda: results.append(b.infer(job(3))))
        first.start()
        assert started.wait(30) and b.rows() == 3
        with pytest.raises(APIError) as exc:
            b.infer(job(3))
        assert exc.value.status == 503 and "--max-queue-rows 5" in exc.value.message and exc.value.retry_after
        second = threading.Thread(target=lambda: results.append(b.infer(job(2))))
        second.start()
        release.set()
        first.join(30)
        second.join(30)
        assert len(results) == 2 and b.rows() == 0
        assert b.infer(job(3)).probs.shape == (3, 3)   # admitted again
    finally:
        release.set()
        b.close()


def test_embedded_http_queue_full_of_rows_is_503_with_retry_after():
    """Through the app: the batcher already holds rows up to the limit -> 503, Retry-After, the flag."""
    app = create_app(ServerConfig(max_queue_rows=12), models=[make_fake_model()])
    batcher = app.extensions["inference"].dispatcher.batchers["fake"]
    batcher._rows = 5   # five rows of other requests queued or running
    r = app.test_client().post("/predict", data=png_bytes(), content_type="image/png",
                               query_string={"tta": "ten-crop"})
    assert r.status_code == 503 and "--max-queue-rows" in r.get_json()["error"] and r.headers["Retry-After"] == "1"
    batcher._rows = 0
    assert app.test_client().post("/predict", data=png_bytes(), content_type="image/png",
                                  query_string={"tta": "ten-crop"}).status_code == 200


def test_limit_flags_reach_the_config_and_are_validated():
    from server.__main__ import config_from_args
    cfg, _ = config_from_args(["--bundle", "b", "--max-tta-views", "3", "--max-tta-scale", "1.5",
                               "--max-request-pixels", "1000", "--max-queue-rows", "7"])
    assert (cfg.max_tta_views, cfg.max_tta_scale, cfg.max_request_pixels, cfg.max_queue_rows) == (3, 1.5, 1000, 7)
    for bad in (dict(max_tta_scale=0.5), dict(max_queue_rows=0), dict(max_tta_views=0), dict(max_request_pixels=0)):
        with pytest.raises(ValueError, match="--max-"):
            ServerConfig(bundles=["b"], **bad).validate()


# -- 500s found by the fuzz test, now 4xx -------------------------------------------------------
GOOD_INPUT = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png_bytes()).decode()]}


@pytest.mark.parametrize("body, words", [
    ({"inputs": [GOOD_INPUT], "parameters": [1]}, "parameters\" must be a JSON object"),
    ({"inputs": [GOOD_INPUT], "outputs": "probs"}, "\"outputs\" must be a list"),
    ({"inputs": [GOOD_INPUT], "outputs": [1]}, "each of \"outputs\""),
    ({"inputs": [GOOD_INPUT], "outputs": [{"name": "probs", "parameters": 3}]}, "output parameters"),
    ({"inputs": [5]}, "each of \"inputs\""),
    ({"inputs": [dict(GOOD_INPUT, parameters=[1])]}, "parameters must be a JSON object"),
    ({"inputs": [dict(GOOD_INPUT, parameters={"binary_data_size": "abc"})]}, "non-negative integer"),
    ({"inputs": [dict(GOOD_INPUT, parameters={"binary_data_size": float("inf")})]}, "non-negative integer"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [True], "data": [1]}]}, "non-negative integers"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [1.5e300]}]},
     "not a list of integers"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2**62, 2**62], "data": [1]}]}, "input tensor has shape"),
    ({"inputs": [GOOD_INPUT], "parameters": {"tta": 5}}, "tta must be a string"),
])
def test_malformed_kserve_structures_are_400(body, words):
    client = create_app(ServerConfig(), models=[make_fake_model()]).test_client()
    r = client.post("/v2/models/fake/infer", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 400 and words in r.get_json()["error"], r.get_json()


@pytest.mark.parametrize("field, value, words", [
    ("topk", float("inf"), "topk must be an integer"),
    ("topk", float("nan"), "topk must be an integer"),
    ("model", ["fake"], "model must be a model name"),
    ("tta", {"policy": "hflip"}, "tta must be a string"),
])
def test_json_options_of_the_wrong_type_are_400(field, value, words):
    client = create_app(ServerConfig(), models=[make_fake_model()]).test_client()
    body = json.dumps({"images": [base64.b64encode(png_bytes()).decode()], field: value})   # Infinity, NaN
    r = client.post("/predict", data=body, content_type="application/json")
    assert r.status_code == 400 and words in r.get_json()["error"], r.get_json()


# -- JSON depth and image counts: checked where the input enters, before anything is built -------
def _deep(depth: int, kind: str = "list") -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


def _kserve_input(n: int = 1, **extra) -> dict:
    return dict({"name": "images", "datatype": "BYTES", "shape": [n],
                 "data": [base64.b64encode(png_bytes()).decode()] * n}, **extra)


@pytest.mark.parametrize("depth", [33, 800, 1000, 100_000])
@pytest.mark.parametrize("where", ["predict body", "predict tta", "kserve body", "kserve id", "kserve binary header"])
def test_deeply_nested_json_is_a_400_on_every_json_route(depth, where):
    """Before: 500 (RecursionError) from 1000 levels, in the parser or later (an echoed id, a repr).
    33 is one over the limit; 800 parses in Python but broke whatever recursed into it next."""
    client = create_app(ServerConfig(), models=[make_fake_model()]).test_client()
    deep, kind = _deep(depth, "list" if depth % 2 == 0 else "object"), "application/json"
    if where == "predict body":
        r = client.post("/predict", data=deep, content_type=kind)
    elif where == "predict tta":
        r = client.post("/predict", data='{"images": ["%s"], "tta": %s}' % (base64.b64encode(png_bytes()).decode(), deep),
                        content_type=kind)
    elif where == "kserve body":
        r = client.post("/v2/models/fake/infer", data=deep, content_type=kind)
    elif where == "kserve id":
        r = client.post("/v2/models/fake/infer", data=json.dumps({"inputs": [_kserve_input()]})[:-1] + ', "id": ' + deep + "}",
                        content_type=kind)
    else:
        head = (json.dumps({"inputs": [_kserve_input()]})[:-1] + ', "parameters": {"x": ' + deep + "}}").encode()
        r = client.post("/v2/models/fake/infer", data=head + b"\0" * 4,
                        headers={"Inference-Header-Content-Length": str(len(head))}, content_type="application/octet-stream")
    body = r.get_json()
    assert r.status_code == 400 and "more than 32 levels deep" in body["error"], (r.status_code, body)


def test_json_within_the_depth_limit_is_served_and_brackets_in_strings_do_not_count():
    client = create_app(ServerConfig(), models=[make_fake_model()]).test_client()
    x = np.random.default_rng(1).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    nested = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 3, 32, 32], "data": x.tolist()}],
              "id": "[" * 500 + "{" * 500}   # 7 levels of structure, 6000 brackets in all (and 1000 in a string)
    r = client.post("/v2/models/fake/infer", data=json.dumps(nested), content_type="application/json")
    assert r.status_code == 200 and r.get_json()["outputs"][0]["shape"] == [2, 3], r.get_json()
    escaped = json.dumps({"images": [base64.b64encode(png_bytes()).decode()], "model": "fake", "id": '\\"[' * 40})
    assert client.post("/predict", data=escaped, content_type="application/json").status_code == 200
    utf16 = json.dumps(nested).encode("utf-16")   # json.loads takes UTF-16/32 too; so does the depth scan
    assert client.post("/v2/models/fake/infer", data=utf16, content_type="application/json").status_code == 200


def _count_requests(n: int) -> dict[str, tuple]:
    """n images on every route that can carry more than one: {route: (method args)}."""
    png64 = base64.b64encode(png_bytes()).decode()
    binary = b"".join(struct.pack("<I", 0) for _ in range(min(n, 1000)))   # fewer elements than declared
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [n],
                                   "parameters": {"binary_data_size": len(binary)}}]}).encode()
    return {
        "json": ("/predict", dict(data=json.dumps({"images": [""] * n}), content_type="application/json")),
        "multipart": ("/predict", dict(data={"file": [(io.BytesIO(b""), f"{i}.png") for i in range(min(n, 200))]},
                                       content_type="multipart/form-data")),
        "kserve BYTES data": ("/v2/models/fake/infer", dict(json={"inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [n], "data": [png64] * 2}]})),
        "kserve BYTES binary": ("/v2/models/fake/infer", dict(
            data=head + binary, headers={"Inference-Header-Content-Length": str(len(head))})),
        "kserve UINT8": ("/v2/models/fake/infer", dict(json={"inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [n, 3, 32, 32], "data": [0] * 5}]})),
    }


def test_image_counts_get_the_same_413_on_every_route_before_any_list_is_built(monkeypatch):
    """--max-images 4: every route answers the same 413 naming the flag. The counts are read
    before anything is built: no base64 string is decoded for a JSON list of a million entries,
    and a KServe shape of [10000000] is refused from the shape (before: 400s worded differently per
    route, after the lists were built)."""
    import server.api_predict
    decoded = []
    real_b64 = server.api_predict._b64
    monkeypatch.setattr(server.api_predict, "_b64", lambda *a: (decoded.append(1), real_b64(*a))[1])
    client = create_app(ServerConfig(max_images=4), models=[make_fake_model()]).test_client()
    for n in (5, 200, 1_000_000, 10_000_000):
        for route, (path, kwargs) in _count_requests(n).items():
            if route == "multipart" and n > 200 or route == "json" and n > 1_000_000:
                continue   # werkzeug refuses more than 1000 form parts itself; a 10M list is 40 MB of JSON
            r = client.post(path, **kwargs)
            shown = min(n, 200) if route == "multipart" else n
            assert (r.status_code, r.get_json()["error"]) == (
                413, f"{shown:,} images in one request; the limit is 4 (--max-images): split the request"), (route, n)
    assert decoded == []
    r = client.post("/predict", json={"images": []})
    assert r.status_code == 400 and "no image in the request" in r.get_json()["error"]
    r = client.post("/v2/models/fake/infer", json={"inputs": [_kserve_input(0, data=[])]})
    assert r.status_code == 400 and "no image in the request" in r.get_json()["error"]


def test_binary_bytes_elements_are_read_no_further_than_the_shape(monkeypatch):
    """shape [1] followed by a million 4-byte elements: refused after the second, not after
    building a list of a million (before: the whole list, then the count compared)."""
    import server.api_kserve
    unpacked = []
    real_unpack = server.api_kserve.struct.unpack_from
    monkeypatch.setattr(server.api_kserve, "struct", SimpleNamespace(
        unpack_from=lambda *a: (unpacked.append(1), real_unpack(*a))[1]))
    client = create_app(ServerConfig(), models=[make_fake_model()]).test_client()
    binary = struct.pack("<I", 0) * 1_000_000
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(binary)}}]}).encode()
    r = client.post("/v2/models/fake/infer", data=head + binary, headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "more than the 1 elements" in r.get_json()["error"], r.get_json()
    assert len(unpacked) == 1
