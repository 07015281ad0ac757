"""The raw-body POST /predict path that bypasses Flask answers exactly as the Flask route does."""
from __future__ import annotations

import io
import sys

import pytest
from werkzeug.test import Client
from werkzeug.wrappers import Response

from server.app import create_app
from server.config import ServerConfig
from server_fixtures import make_fake_model, png_bytes


@pytest.fixture(scope="module")
def app():
    app = create_app(ServerConfig(max_request_bytes=200_000, max_images=4, max_delay_ms=2), models=[make_fake_model()])
    yield app
    app.extensions["inference"].dispatcher.close()


class Counting:
    """Wraps the Flask WSGI app behind the fast path and counts the requests that reach it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, environ, start_response):
        self.calls += 1
        return self.inner(environ, start_response)


@pytest.fixture
def clients(app, monkeypatch):
    """(through the fast path, Flask only, the counter of requests that reached Flask)."""
    fast_path = app.wsgi_app.next   # under the FrontLayer (request ids, API keys, drain)
    flask_only = fast_path.next
    counting = Counting(flask_only)
    monkeypatch.setattr(fast_path, "next", counting)
    return app.test_client(), Client(flask_only, Response), counting


def strip_timings(body: dict) -> dict:
    body.pop("timings_ms", None)
    return body


@pytest.mark.parametrize("data,ctype,query,status", [
    (png_bytes(seed=3), "image/png", {}, 200),
    (png_bytes(seed=4), "image/png; charset=binary", {"topk": "2", "tta": "hflip"}, 200),
    (png_bytes(seed=4), "application/octet-stream", {"topk": ["1", "3"]}, 200),   # the first value counts
    (png_bytes(seed=5, fmt="JPEG"), "IMAGE/JPEG", {"model": "fake"}, 200),
    (b"", "image/png", {}, 400),
    (png_bytes()[:80], "image/png", {}, 422),
    (b"just text", "image/jpeg", {}, 415),
    (png_bytes(), "image/png", {"model": "nope"}, 404),
    (png_bytes(), "image/png", {"tta": "sideways"}, 422),
    (png_bytes(), "image/png", {"topk": "many"}, 400),
    (png_bytes(), "image/png", {"topk": ""}, 400),
    (b"\0" * 300_000, "image/png", {}, 413),
])
def test_fast_path_answers_exactly_as_the_flask_route(clients, data, ctype, query, status):
    fast, flask_only, reached_flask = clients
    a = fast.post("/predict", data=data, content_type=ctype, query_string=query)
    b = flask_only.post("/predict", data=data, content_type=ctype, query_string=query)
    assert reached_flask.calls == 0   # the fast path answered it
    assert (a.status_code, b.status_code) == (status, status), (a.get_json(), b.get_json())
    assert a.headers["Content-Type"] == b.headers["Content-Type"] == "application/json"
    assert strip_timings(a.get_json()) == strip_timings(b.get_json())
    if status != 200:   # the error bodies are byte for byte the same
        assert a.data == b.data


def test_other_requests_go_to_flask(clients):
    fast, _, reached_flask = clients
    data = png_bytes(seed=6)
    assert fast.post("/predict", data={"file": (io.BytesIO(data), "a.png")},
                     content_type="multipart/form-data").status_code == 200
    assert fast.get("/predict").status_code == 405
    assert fast.post("/predict", data=b"x=1", content_type="application/x-www-form-urlencoded").status_code == 415
    assert fast.get("/v2/health/ready").status_code == 200
    assert reached_flask.calls == 4


def raw_environ(body: bytes, **extra) -> dict:
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/predict", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
           "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
           "wsgi.input": io.BytesIO(body), "CONTENT_TYPE": "image/png", "wsgi.version": (1, 0),
           "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}
    env.update(extra)
    return env


def call(app, environ) -> tuple[str, dict, bytes]:
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


def test_a_body_shorter_than_its_content_length_is_a_400(app, clients):
    _, _, reached_flask = clients
    fast = call(app, raw_environ(b"\x89PNG", CONTENT_LENGTH="1000"))
    flask_only = call(reached_flask.inner, raw_environ(b"\x89PNG", CONTENT_LENGTH="1000"))
    assert fast[0] == flask_only[0] == "400 BAD REQUEST"
    assert fast[2] == flask_only[2] and fast[1]["Content-Length"] == str(len(fast[2]))
    assert reached_flask.calls == 0


@pytest.mark.parametrize("body,extra,status,words", [
    (png_bytes(seed=7), {"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"}, "200 OK", b'"predictions"'),
    (b"\0" * 300_000, {"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"}, "413 REQUEST ENTITY TOO LARGE",
     b"--max-request-bytes"),
    (png_bytes(seed=7), {}, "400 BAD REQUEST", b"empty image"),   # no length, stream not terminated: no body
])
def test_a_body_without_content_length(app, clients, body, extra, status, words):
    _, _, reached_flask = clients
    fast = call(app, raw_environ(body, **extra))
    flask_only = call(reached_flask.inner, raw_environ(body, **extra))
    assert fast[0] == flask_only[0] == status and words in fast[2]
    if not status.startswith("200"):
        assert fast[2] == flask_only[2]
    assert reached_flask.calls == 0


def test_fast_path_counts_requests_and_latency(app):
    fast = app.test_client()
    before = fast.get("/metrics").get_data(as_text=True)
    fast.post("/predict", data=png_bytes(), content_type="image/png")
    fast.post("/predict", data=b"", content_type="image/png")
    text = fast.get("/metrics").get_data(as_text=True)

    def value(text: str, series: str) -> float:
        line = next((ln for ln in text.splitlines() if ln.startswith(series + " ")), None)
        return float(line.split()[-1]) if line else 0.0

    for series, added in (('server_requests_total{endpoint="/predict",status="200"}', 1),
                          ('server_requests_total{endpoint="/predict",status="400"}', 1),
                          ('server_request_seconds_count{endpoint="/predict"}', 2)):
        assert value(text, series) - value(before, series) == added, series
