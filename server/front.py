"""The outermost WSGI layer of the HTTP front: request id, API keys, requests in flight, drain.

    app.wsgi_app = FrontLayer(app.wsgi_app, keys, drain, metrics)   # done by create_app

It wraps everything, the raw-body fast path included, so no route escapes it:
- ``X-Request-ID``: a client's (printable ASCII, at most 128 characters) or a fresh one; returned on
  every response, errors too, set in a context variable that ``server.logs`` puts into every log
  line and ``InferenceService`` into ``Job.request_id``.
- API keys (``--api-key`` / ``SERVER_API_KEY``): ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``;
  the sha256 of the key sent is compared with each configured key's (``hmac.compare_digest`` of two
  32-byte digests: the time says nothing about a key's length or content). Liveness and readiness
  stay open (orchestrators probe them without a key); ``environ["server.authorized"]`` tells a
  route whether this caller may see details (readiness shows model names and reasons only then).
- Drain: requests in flight are counted in a ``DrainState`` that may live in shared memory (the
  granian parent process waits on it); once draining, readiness answers 503 at once.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import multiprocessing
import os
import re
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")   # printable ASCII without spaces: safe in headers and logs
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/healthz")   # /healthz: liveness (server.api_ops)
AUTHORIZED = "server.authorized"   # environ key: True when no keys are configured or a valid one was sent
READY_PATHS = ("/v2/health/ready",)
# not counted as requests in flight: probes and scrapes must not hold a drain open
UNCOUNTED_PATHS = OPEN_PATHS + ("/metrics",)


def current_request_id() -> str:
    return request_id_var.get()


def parse_api_keys(values: list[str] | None, env: str | None = None) -> tuple[str, ...]:
    """--api-key values (repeatable, each comma-separated for rotation) and the SERVER_API_KEY
    variable -> the accepted keys. Empty: no authentication."""
    keys = []
    for v in [*(values or []), env or ""]:
        keys += [k.strip() for k in v.split(",") if k.strip()]
    for k in keys:
        if not REQUEST_ID_RE.fullmatch(k) or len(k) < 8:
            raise ValueError("an API key must be 8 to 128 printable ASCII characters without spaces "
                             "(--api-key / SERVER_API_KEY)")
    return tuple(dict.fromkeys(keys))


class DrainState:
    """Requests in flight and the draining flag, in shared memory so that the process that receives
    SIGTERM (granian's parent) can wait on the worker process that serves (created before the fork)."""

    def __init__(self):
        ctx = multiprocessing.get_context("fork")
        self._draining = ctx.Value("b", 0, lock=False)   # written once, by one process
        self._inflight = ctx.Value("i", 0)

    @property
    def draining(self) -> bool:
        return bool(self._draining.value)

    def start(self) -> None:
        self._draining.value = 1

    def enter(self) -> None:
        with self._inflight.get_lock():
            self._inflight.value += 1

    def leave(self) -> None:
        with self._inflight.get_lock():
            self._inflight.value -= 1

    @property
    def in_flight(self) -> int:
        return self._inflight.value

    def wait_idle(self, timeout_s: float, quiet_s: float = 0.2) -> bool:
        """Block until no request has been in flight for quiet_s (a request granian queued behind a
        busy thread starts the moment one frees: a single zero reading is not enough), or timeout_s.
        True when idle, False on timeout."""
        deadline = time.monotonic() + timeout_s
        idle_since = None
        while time.monotonic() < deadline:
            if self.in_flight > 0:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= quiet_s:
                return True
            time.sleep(0.02)
        return False


def _json_response(start_response, status: str, body: dict, headers: list) -> list[bytes]:
    data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers])
    return [data]


class FrontLayer:
    def __init__(self, wsgi_app, api_keys: tuple[str, ...] = (), drain: DrainState | None = None, metrics=None):
        self.next, self.drain = wsgi_app, drain or DrainState()
        # digests, not the keys: compare_digest on inputs of unequal length returns early, which
        # would tell a caller how long the keys are
        self._keys = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self._auth_failures = metrics.auth_failures if metrics is not None else None

    def _authorized(self, environ) -> bool:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else environ.get("HTTP_X_API_KEY", "")
        given_digest = hashlib.sha256(given.encode("utf-8", "replace")).digest()
        ok = False
        for key in self._keys:   # every key compared, whatever matched: constant time in the key count too
            ok |= hmac.compare_digest(given_digest, key)
        return ok

    def __call__(self, environ, start_response):
        rid = environ.get("HTTP_X_REQUEST_ID", "")
        if not REQUEST_ID_RE.fullmatch(rid):
            rid = os.urandom(16).hex()   # 32 hex digits like uuid4().hex, in a quarter of the time
        environ["server.request_id"] = rid
        token = request_id_var.set(rid)
        path = environ.get("PATH_INFO", "")
        counted = path not in UNCOUNTED_PATHS
        if counted:
            self.drain.enter()
        try:
            def start(status, headers, exc_info=None):
                return start_response(status, [*headers, ("X-Request-ID", rid)], exc_info)

            authorized = not self._keys or self._authorized(environ)
            environ[AUTHORIZED] = authorized
            if not authorized and path not in OPEN_PATHS:
                if self._auth_failures is not None:
                    self._auth_failures.inc()
                return _json_response(start, "401 UNAUTHORIZED", {
                    "error": "missing or wrong API key: send the header 'Authorization: Bearer KEY' or "
                             "'X-API-Key: KEY' with a key given to the server (--api-key / SERVER_API_KEY)",
                    "status": 401}, [("WWW-Authenticate", 'Bearer realm="shipclassifier"')])
            if self.drain.draining and (path in READY_PATHS or path.startswith("/v2/models/") and path.endswith("/ready")):
                return _json_response(start, "503 SERVICE UNAVAILABLE", {
                    "ready": False, "reason": "draining: SIGTERM received; answering the requests in flight, "
                                              "then exiting (--drain-timeout)"}, [])
            return self.next(environ, start)
        finally:
            request_id_var.reset(token)
            if counted:
                self.drain.leave()
