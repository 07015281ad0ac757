"""``POST /predict`` with a raw image body, answered before Flask sees the request.

That is the request a client library or ``curl --data-binary @photo.jpg`` sends, and on CPU it is
the hot path: for a small model the per-request work around the model call matters as much as the
model (mobilenet_v3_large on 2 cores: ~9 ms of CPU per request, of which Flask's request and
response objects, routing, context push and ``jsonify`` took ~0.2-0.4 ms). This WSGI middleware
reads the body, the ``model``/``tta``/``topk`` query arguments and answers with the same JSON bytes,
the same error bodies and status codes and the same metrics as the Flask route; everything else
(multipart, JSON, other routes) goes to Flask unchanged.
"""
from __future__ import annotations

import logging
import time
from urllib.parse import parse_qsl

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

from .errors import APIError, error_body, http_error_message, retry_headers, unexpected_message

log = logging.getLogger("server")

RAW_TYPES = ("image/", "application/octet-stream")
OPTIONS = ("model", "tta", "topk")
ENDPOINT = "/predict"


def read_raw_body(environ, max_bytes: int | None) -> bytes:
    """A raw request body, as Werkzeug reads one (the Content-Length bytes; a chunked stream, which
    the server marks as terminated, to its end; no length and no chunks: empty), except that a
    chunked body over ``max_bytes`` is a 413 (Werkzeug's own read cuts it at the limit, and the
    image would then be reported as corrupt). The Flask route's raw branch reads with this too."""
    try:
        data = get_input_stream(environ, max_content_length=max_bytes).read()
    except HTTPException as exc:   # Content-Length over the limit (413), a body cut short (400)
        raise APIError(exc.code or 400, http_error_message(exc, max_bytes)) from None
    if (max_bytes is not None and len(data) >= max_bytes and get_content_length(environ) is None
            and "wsgi.input_terminated" in environ and environ["wsgi.input"].read(1)):
        raise APIError(413, http_error_message(RequestEntityTooLarge(), max_bytes))
    return data


class RawPredictPath:
    """WSGI middleware: ``app.wsgi_app = RawPredictPath(app, app.wsgi_app)``."""

    def __init__(self, app, wsgi_app):
        self.app, self.next = app, wsgi_app
        self.service = app.extensions["inference"]
        self.metrics = self.service.metrics
        self._count = {}   # status -> the counter child (labels() takes a lock and builds a tuple)
        self._latency = self.metrics.request_latency.labels(ENDPOINT)

    def handles(self, environ) -> bool:
        if environ.get("PATH_INFO") != ENDPOINT or environ.get("REQUEST_METHOD") != "POST":
            return False
        ctype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        return ctype.startswith(RAW_TYPES)

    def __call__(self, environ, start_response):
        if not self.handles(environ):
            return self.next(environ, start_response)
        # server.arrival: when BufferedFront had the whole body (the deadline then counts the thread queue)
        t0, arrival = time.perf_counter(), environ.get("server.arrival") or time.time()
        try:
            status, payload, headers = 200, self.answer(environ, arrival), []
        except APIError as exc:
            status, payload, headers = exc.status, error_body(exc.status, exc.message), retry_headers(exc.retry_after)
        except Exception as exc:   # as the Flask app's handler: logged, and a 500 that names no internals
            log.exception("unhandled error")
            status, payload, headers = 500, error_body(500, unexpected_message(exc)), []
        # Flask's jsonify bytes: compact separators outside debug mode, a trailing newline
        body = (self.app.json.dumps(payload, separators=(",", ":")) + "\n").encode()
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}",   # as Werkzeug
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
        counter = self._count.get(status)
        if counter is None:
            counter = self._count[status] = self.metrics.requests.labels(ENDPOINT, str(status))
        counter.inc()
        self._latency.observe(time.perf_counter() - t0)
        return [body]

    def answer(self, environ, arrival: float | None = None) -> dict:
        data = read_raw_body(environ, self.app.config.get("MAX_CONTENT_LENGTH"))   # as the route: read per request
        opts = {}
        for key, value in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True):
            if key in OPTIONS and key not in opts:   # the first value, as Flask's request.args.get
                opts[key] = value
        return self.service.classify_images([("body", data)], opts.get("model"), opts.get("tta"),
                                            opts.get("topk", 5), arrival=arrival)

