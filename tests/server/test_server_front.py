"""The outer WSGI layer in process: X-Request-ID, API keys, requests in flight and readiness while
draining, request ids in log lines, JSON logs, metric names (fast path and Flask routes alike)."""
from __future__ import annotations

import io
import json
import logging
import threading
from contextlib import nullcontext

import numpy as np
import pytest

from server.app import create_app
from server.batching import BatchResult
from server.config import ServerConfig
from server.errors import APIError
from server.front import parse_api_keys
from server.logs import JsonFormatter, RequestIdFilter
from server_fixtures import make_fake_model, png_bytes

KEYS = ("key-one-aaaa", "key-two-bbbb")
log = logging.getLogger("server.test_front")


class RecordingDispatcher:
    """Answers every job with uniform probabilities, records it, logs a line about it; ``gate``
    (when set) holds each job until released; ``fail`` makes it raise instead."""

    def __init__(self):
        self.jobs, self.gate, self.entered, self.fail = [], None, threading.Event(), None

    def infer(self, job):
        self.jobs.append(job)
        log.warning("job %s computed", job.id)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        return BatchResult(np.full((job.n_images, 3), 1 / 3, np.float32), job.rows, 0.0, 0.0)

    def arriving(self, model):
        return nullcontext()

    def depth(self, model):
        return 0

    def solo_batches(self, model):
        return 7

    def ready(self, model):
        return True, "ok"

    def close(self):
        pass


def _app(api_keys=()):
    disp = RecordingDispatcher()
    app = create_app(ServerConfig(max_request_bytes=200_000, max_images=4, api_keys=api_keys),
                     models=[make_fake_model()], dispatcher=disp)
    return app, disp


@pytest.fixture
def records():
    """Log records about requests as the configured handler formats them (JSON), one dict each."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(json.loads(self.format(record)))

    h = Collect()
    h.addFilter(RequestIdFilter())
    h.setFormatter(JsonFormatter())
    log.addHandler(h)
    yield lines
    log.removeHandler(h)


def test_request_id_is_taken_or_made_returned_everywhere_and_put_in_the_job_and_its_logs(records):
    app, disp = _app()
    c = app.test_client()
    r = c.post("/predict", data=png_bytes(), content_type="image/png", headers={"X-Request-ID": "client-id-1"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "client-id-1"             # the fast path
    assert disp.jobs[-1].request_id == "client-id-1"
    assert records[-1]["request_id"] == "client-id-1" and records[-1]["message"].endswith("computed")
    r = c.post("/predict", data={"file": (io.BytesIO(png_bytes()), "a.png")}, content_type="multipart/form-data",
               headers={"X-Request-ID": "client-id-2"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "client-id-2"             # a Flask route
    assert disp.jobs[-1].request_id == "client-id-2" and records[-1]["request_id"] == "client-id-2"
    r = c.post("/predict", data=b"", content_type="image/png", headers={"X-Request-ID": "client-id-3"})
    assert r.status_code == 400 and r.headers["X-Request-ID"] == "client-id-3"             # errors too
    assert c.get("/nothing", headers={"X-Request-ID": "client-id-4"}).headers["X-Request-ID"] == "client-id-4"
    made = set()
    for bad in (None, "", "has space", "x" * 129, "caf\u00e9"):   # absent or invalid: a fresh one
        headers = {} if bad is None else {"X-Request-ID": bad.encode().decode("latin-1")}
        rid = c.post("/predict", data=png_bytes(), content_type="image/png", headers=headers).headers["X-Request-ID"]
        assert len(rid) == 32 and int(rid, 16) >= 0 and rid == disp.jobs[-1].request_id
        made.add(rid)
    assert len(made) == 5
    logging.getLogger("server.test_front").warning("outside a request")
    assert records[-1]["request_id"] == "-"


def test_api_keys_guard_every_route_but_health(records):
    app, _ = _app(KEYS)
    c = app.test_client()
    for path, kwargs in (("/predict", dict(method="POST", data=png_bytes(), content_type="image/png")),   # fast path
                         ("/predict", dict(method="POST", json={"images": []})),
                         ("/models", {}), ("/metrics", {}), ("/v2/models/fake", {})):
        for headers in ({}, {"Authorization": "Bearer wrong-key-xxxx"}, {"X-API-Key": KEYS[0][:-1]},
                        {"Authorization": KEYS[0]}):   # a key without "Bearer " is no key
            r = c.open(path, headers=headers, **kwargs)
            body = r.get_json()
            assert r.status_code == 401 and body["status"] == 401, (path, headers, r.status_code)
            assert "Authorization: Bearer KEY" in body["error"] and "X-API-Key" in body["error"]
            assert "--api-key" in body["error"] and KEYS[0] not in r.get_data(as_text=True)
            assert r.headers["WWW-Authenticate"].startswith("Bearer") and r.headers["X-Request-ID"]
    ok = c.post("/predict", data=png_bytes(), content_type="image/png", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert ok.status_code == 200
    ok = c.post("/predict", data={"file": (io.BytesIO(png_bytes()), "a.png")}, content_type="multipart/form-data",
                headers={"X-API-Key": KEYS[1]})   # the second (rotated) key, through Flask
    assert ok.status_code == 200
    assert c.get("/models", headers={"authorization": f"bearer {KEYS[1]}"}).status_code == 200
    for path in ("/v2/health/live", "/v2/health/ready"):   # probes need no key
        assert c.get(path).status_code == 200
    text = c.get("/metrics", headers={"X-API-Key": KEYS[0]}).get_data(as_text=True)
    assert "server_auth_failures_total 20.0" in text
    assert not any(k in json.dumps(records) for k in KEYS)   # keys are never logged


def test_api_keys_from_flags_and_environment():
    assert parse_api_keys(["key-one-aaaa,key-two-bbbb", "key-one-aaaa"], " key-env-cccc ") == (
        "key-one-aaaa", "key-two-bbbb", "key-env-cccc")
    assert parse_api_keys([], None) == () and parse_api_keys([], "") == ()
    for bad in (["short"], ["has space inside"]):
        with pytest.raises(ValueError, match="8 to 128 printable ASCII"):
            parse_api_keys(bad)


def test_draining_turns_readiness_503_and_counts_requests_in_flight():
    app, disp = _app()
    drain = app.extensions["drain"]
    c = app.test_client()
    disp.gate = threading.Event()
    got = {}
    t = threading.Thread(target=lambda: got.update(r=c.post("/predict", data=png_bytes(), content_type="image/png")))
    t.start()
    assert disp.entered.wait(10)
    assert drain.in_flight == 1
    assert 'server_requests_in_flight 1.0' in c.get("/metrics").get_data(as_text=True)   # scrapes not counted
    assert c.get("/v2/health/ready").status_code == 200
    drain.start()
    r = c.get("/v2/health/ready")
    assert r.status_code == 503 and r.get_json()["ready"] is False and "draining" in r.get_json()["reason"]
    assert c.get("/v2/models/fake/ready").status_code == 503
    assert c.get("/v2/health/live").status_code == 200
    assert not drain.wait_idle(0.3)           # a request is still in flight
    disp.gate.set()
    t.join(10)
    assert got["r"].status_code == 200        # answered while draining
    assert drain.wait_idle(5) and drain.in_flight == 0


def test_metrics_follow_prometheus_conventions_with_per_model_outcomes():
    app, disp = _app()
    c = app.test_client()
    c.post("/predict", data=png_bytes(), content_type="image/png")
    disp.fail = APIError(503, "queue full", retry_after=1)
    assert c.post("/predict", data=png_bytes(), content_type="image/png").status_code == 503
    assert c.post("/predict", data=png_bytes(), content_type="image/png").status_code == 503
    text = c.get("/metrics").get_data(as_text=True)
    assert 'server_predictions_total{model="fake",outcome="success"} 1.0' in text
    assert 'server_predictions_total{model="fake",outcome="failure"} 2.0' in text
    assert "# TYPE server_solo_batches_total counter" in text and 'server_solo_batches_total{model="fake"} 7.0' in text
    assert 'server_queue_depth{model="fake"} 0.0' in text
    counters = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE") and ln.endswith(" counter")]
    assert len(counters) >= 7 and all(name.endswith("_total") for name in counters), counters


def test_json_log_lines_parse_and_carry_exceptions():
    rec = logging.LogRecord("server", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    RequestIdFilter().filter(rec)
    try:
        raise RuntimeError("inner")
    except RuntimeError:
        import sys
        rec.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "boom x" and out["level"] == "ERROR" and out["request_id"] == "-"
    assert "RuntimeError: inner" in out["exception"] and out["time"].endswith("Z")


def test_client_sends_the_api_key_from_its_argument_or_the_environment(monkeypatch):
    from server.client import Client, ServerError
    from server_fixtures import LiveServer

    app, _ = _app(KEYS)
    live = LiveServer(app)
    try:
        monkeypatch.delenv("SERVER_API_KEY", raising=False)
        with pytest.raises(ServerError) as exc:
            Client(live.url, timeout=10).predict(png_bytes())
        assert exc.value.status == 401 and "X-API-Key" in exc.value.message
        assert Client(live.url, timeout=10).ready()   # readiness needs no key
        assert Client(live.url, timeout=10, api_key=KEYS[1]).predict(png_bytes())["model"] == "fake"
        monkeypatch.setenv("SERVER_API_KEY", f"{KEYS[0]},{KEYS[1]}")
        assert Client(live.url, timeout=10).models()["default"] == "fake"
    finally:
        live.close()


def test_worker_and_front_take_the_operations_flags():
    from server.__main__ import config_from_args
    from server.worker import build_parser as worker_parser

    a = worker_parser().parse_args(["--redis-url", "redis://x", "--metrics-port", "9100", "--metrics-host", "0.0.0.0",
                                    "--log-format", "json"])
    assert a.metrics_host == "0.0.0.0" and a.log_format == "json"
    assert worker_parser().parse_args(["--redis-url", "redis://x"]).metrics_host == "127.0.0.1"
    cfg, a = config_from_args(["--bundle", "b", "--drain-timeout", "5", "--api-key", "key-one-aaaa,key-two-bbbb",
                               "--log-format", "json"])
    assert cfg.drain_timeout_s == 5 and cfg.api_keys == KEYS and a.log_format == "json"
    with pytest.raises(ValueError, match="--drain-timeout"):
        config_from_args(["--bundle", "b", "--drain-timeout", "-1"])[0].validate()


def test_json_logging_writes_one_object_per_line_with_the_request_id():
    import subprocess
    import sys

    from conftest import REPO
    code = ("import logging; from server.logs import setup_logging; from server.front import request_id_var; "
            "setup_logging('INFO', 'json'); request_id_var.set('rid-7'); "
            "logging.getLogger('server').info('hello %s', 1)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    line = json.loads(r.stderr.strip().splitlines()[-1])
    assert line["message"] == "hello 1" and line["request_id"] == "rid-7" and line["logger"] == "server"
