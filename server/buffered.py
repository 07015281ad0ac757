"""Granian's entry for ``python -m server``: the request body is read in asyncio, against a deadline and a
minimum rate, before a handler thread is taken; the WSGI app then runs on a pool of ``--http-threads``.

    app = BufferedFront(wsgi_app, BodyPolicy(...), threads=64, pending=DrainState())   # server.serving

Why not granian's WSGI interface: it calls the app as soon as the headers are in and hands it a body
stream that the handler thread reads with no timeout, and its backpressure counts connections. 150
clients that sent headers and then one body byte every 2 s held the threads, and a normal request
waited 12-16 s; a few hundred such sockets took every connection slot, liveness included. Here:

- headers: granian (Rust) reads them within ``--header-timeout-s`` or closes the connection; no Python
  runs for a request before its headers are complete.
- body: read here chunk by chunk, the whole of it within ``--body-timeout-s`` plus one second for every
  ``--body-min-rate`` bytes received (Apache's mod_reqtimeout rule: a client that keeps up the rate
  is never cut, one that trickles is cut at the first deadline it misses) -> 408 and the connection
  closed. A waiting body costs a coroutine, not a thread.
- bytes: bodies held here at once (received, until their answer is sent) are bounded by
  ``--http-threads x --max-request-bytes``, the bound the threads of the WSGI interface gave; over it
  a 503 with Retry-After. A declared Content-Length over ``--max-request-bytes`` is not read at all.
- threads: complete requests queue for ``--http-threads`` handler threads; liveness and readiness
  run on a thread of their own, so they answer while every handler thread waits for a batch.

The app sees the environ granian's WSGI interface builds (``wsgi.input_terminated``, latin-1 PATH_INFO,
repeated headers joined with ",") with ``server.arrival`` set when the body was complete: the request
deadline (``--timeout-s``) counts from there, so time in the thread queue counts and upload time does not.
"""
from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import sys
import time
import threading
from dataclasses import dataclass

log = logging.getLogger("server")

PROBE_PATHS = ("/v2/health/live", "/v2/health/ready")
# declared bodies up to this size are read in one piece: a loop wake-up per chunk costs more CPU than
# the fast path's whole answer, and a slow client's reservation of it is small
SMALL_BODY = 256 * 1024
_BASE_ENVIRON = {"SCRIPT_NAME": "", "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_SOFTWARE": "Granian",
                 "wsgi.version": (1, 0), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
                 "wsgi.multiprocess": False, "wsgi.run_once": False,
                 "wsgi.input_terminated": True}   # the body is complete (werkzeug then reads chunked bodies too)


@dataclass(frozen=True)
class BodyPolicy:
    """How a request body must arrive (``--body-timeout-s``, ``--body-min-rate``) and how many bytes may
    be held (``--max-request-bytes`` per body, ``max_buffered_bytes`` for all bodies at once)."""
    timeout_s: float = 10.0
    min_rate: int = 8192                    # bytes/s; each min_rate bytes received add 1 s
    max_request_bytes: int = 32 * 1024 * 1024
    max_buffered_bytes: int = 64 * 32 * 1024 * 1024

    def allowed_s(self, received: int) -> float:
        """Seconds after the end of the headers by which the body must be complete, or the next chunk in,
        once ``received`` bytes have arrived."""
        return self.timeout_s + received / self.min_rate


class BodyTimeout(Exception):
    pass


def _json(status: int, message: str, *headers: tuple[str, str]) -> tuple[int, list, bytes]:
    body = (json.dumps({"error": message, "status": status}, separators=(",", ":")) + "\n").encode()
    return status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers], body


class BufferedFront:
    """An RSGI application (granian ``Interfaces.RSGI``) around a WSGI app."""

    def __init__(self, wsgi_app, policy: BodyPolicy, threads: int, pending=None):
        self.app, self.policy = wsgi_app, policy
        self.pool = HandlerThreads(threads, "http")
        self.probe_pool = HandlerThreads(1, "probe")
        self.pending = pending    # a DrainState: requests from their headers to their answer (the drain waits on it)
        self.buffered = 0         # bytes of bodies held (read by the one event loop thread only)
        self.cut = 0              # bodies cut by their deadline (408)
        # read in one piece within timeout_s: a client that keeps min_rate sends this much by then
        self.small_body = min(SMALL_BODY, int(policy.min_rate * policy.timeout_s))

    def __rsgi_del__(self, loop) -> None:
        self.pool.close()
        self.probe_pool.close()

    async def __rsgi__(self, scope, protocol) -> None:
        if scope.proto != "http":   # websockets are off in granian's settings
            return
        path = scope.path
        probe = path in PROBE_PATHS
        if self.pending is not None and not probe:
            self.pending.enter()
        held = [0]   # bytes of this body counted in self.buffered
        try:
            headers = scope.headers
            length = headers.get("content-length")
            try:
                declared = int(length) if length is not None else None
                if declared is not None and declared < 0:
                    declared = None
            except ValueError:
                declared = None   # werkzeug answers it (400) from CONTENT_LENGTH
            if declared is not None and declared > self.policy.max_request_bytes:
                body = b""       # not read: the app answers 413 from CONTENT_LENGTH alone
            elif declared == 0 or (declared is None and "transfer-encoding" not in headers):
                body = b""
            else:
                try:
                    body = await (self._read_small_body(protocol, declared, held)
                                  if declared is not None and declared <= self.small_body else
                                  self._read_body(protocol, held))
                except BodyTimeout as exc:
                    self.cut += 1
                    protocol.response_bytes(*_json(408, str(exc), ("Connection", "close")))
                    return
                except _BufferFull as exc:
                    protocol.response_bytes(*_json(503, str(exc), ("Retry-After", "1"), ("Connection", "close")))
                    return
                except Exception:   # the client went away mid-body: nobody reads an answer
                    protocol.response_bytes(*_json(400, "request body cut short by the client",
                                                   ("Connection", "close")))
                    return
            environ = self._environ(scope, path, headers, body)
            done = asyncio.get_running_loop().create_future()
            (self.probe_pool if probe else self.pool).put((self._respond, environ, protocol, done))
            await done
        finally:
            self.buffered -= held[0]
            if self.pending is not None and not probe:
                self.pending.leave()

    async def _read_small_body(self, protocol, declared: int, held: list[int]) -> bytes:
        """A body of at most ``small_body`` declared bytes in one read (one wake-up of the loop instead of
        one per chunk), counted at its declared size, complete within ``timeout_s`` (a client that keeps
        ``min_rate`` has sent it by then: small_body <= min_rate x timeout_s)."""
        policy = self.policy
        if self.buffered + declared > policy.max_buffered_bytes:
            raise _BufferFull(self._full_message())
        self.buffered += declared
        held[0] = declared
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout_at(start + policy.timeout_s):
                return await protocol()
        except TimeoutError:
            raise BodyTimeout(self._slow_message(f"not all of its {declared}", loop.time() - start)) from None

    def _full_message(self) -> str:
        return (f"server busy: {self.buffered} bytes of request bodies are held (at most --http-threads x "
                f"--max-request-bytes = {self.policy.max_buffered_bytes}); retry after the Retry-After seconds")

    def _slow_message(self, received: str, seconds: float) -> str:
        p = self.policy
        return (f"request body too slow: {received} bytes in {seconds:.1f}s; a body must arrive within "
                f"--body-timeout-s {p.timeout_s:g}s plus 1s per --body-min-rate {p.min_rate} bytes")

    async def _read_body(self, protocol, held: list[int]) -> bytes:
        """The whole body, or BodyTimeout / _BufferFull; ``held[0]``: its bytes counted in self.buffered.
        Reads at most max_request_bytes + 1 bytes: the app answers 413 for more (werkzeug's limit on a
        terminated stream), as it does for a declared length."""
        policy, chunks, received = self.policy, [], 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout_at(start + policy.allowed_s(0)) as budget:
                async for chunk in protocol:
                    if not chunk:
                        break
                    n = min(len(chunk), policy.max_request_bytes + 1 - received)
                    if self.buffered + n > policy.max_buffered_bytes:
                        raise _BufferFull(self._full_message())
                    chunks.append(chunk if n == len(chunk) else chunk[:n])
                    received += n
                    self.buffered += n
                    held[0] += n
                    if received > policy.max_request_bytes:
                        break
                    budget.reschedule(start + policy.allowed_s(received))
        except TimeoutError:
            raise BodyTimeout(self._slow_message(f"{received}", loop.time() - start)) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _environ(self, scope, path: str, headers, body: bytes) -> dict:
        server_host, _, server_port = scope.server.rpartition(":")
        env = {**_BASE_ENVIRON, "REQUEST_METHOD": scope.method,
               "PATH_INFO": path.encode("utf-8", "surrogateescape").decode("latin-1"),   # PEP 3333's bytes-as-latin-1
               "QUERY_STRING": scope.query_string.encode("utf-8", "surrogateescape").decode("latin-1"), "SERVER_PROTOCOL": f"HTTP/{scope.http_version}",
               "SERVER_NAME": server_host, "SERVER_PORT": server_port,
               "REMOTE_ADDR": scope.client.rpartition(":")[0], "wsgi.url_scheme": scope.scheme,
               "wsgi.input": io.BytesIO(body), "server.arrival": time.time()}
        for key, value in headers.items():
            if key == "content-type":
                env["CONTENT_TYPE"] = value
            elif key == "content-length":
                env["CONTENT_LENGTH"] = value
            else:
                name = "HTTP_" + key.upper().replace("-", "_")
                env[name] = f"{env[name]},{value}" if name in env else value
        if "HTTP_HOST" not in env:
            env["HTTP_HOST"] = scope.authority or ""
        return env

    def _respond(self, environ: dict, protocol) -> None:
        """In a handler thread: run the app and send its answer (granian's protocol is thread-safe)."""
        started = []

        def start_response(status, headers, exc_info=None):
            if exc_info and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return _no_write

        try:
            result = self.app(environ, start_response)
            try:
                body = result[0] if type(result) is list and len(result) == 1 else b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            status, headers = started
            protocol.response_bytes(int(status[:3]), headers, body)
        except Exception:   # the app's own handlers answer its errors; this is a bug below them
            log.exception("unhandled error in the WSGI app")
            protocol.response_bytes(*_json(500, "internal server error; see the server log"))


class HandlerThreads:
    """``n`` daemon threads that run ``fn(environ, protocol)`` and then resolve ``done`` on its loop.

    A job goes to the thread that became idle last (a stack of idle threads, each woken by its own
    lock), not to whichever of the ``n`` a shared queue wakes: one request at a time then keeps running
    on the same warm thread (its malloc arena, its CPU caches, onnxruntime's per-thread state). Handed
    round-robin over 64 threads, a lone resnet18 request spent 0.35-0.5 ms more in the app at the median
    and its p90 doubled (2 cores). Jobs that find no idle thread wait in FIFO order. One
    ``call_soon_threadsafe`` per job instead of ``run_in_executor`` (a concurrent future, a work item
    and a chained asyncio future per request)."""

    def __init__(self, n: int, name: str):
        self._lock = threading.Lock()
        self._idle: list[_Waiter] = []                 # most recently idle last
        self._backlog: collections.deque = collections.deque()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def put(self, job) -> None:
        with self._lock:
            if not self._idle:
                self._backlog.append(job)
                return
            waiter = self._idle.pop()
        waiter.job = job
        waiter.wake.release()

    def close(self) -> None:
        for _ in self.threads:
            self.put(None)

    def _next(self, waiter: "_Waiter"):
        with self._lock:
            if self._backlog:
                return self._backlog.popleft()
            self._idle.append(waiter)
        waiter.wake.acquire()     # released by put() with waiter.job set
        job, waiter.job = waiter.job, None
        return job

    def _work(self) -> None:
        waiter = _Waiter()
        while (job := self._next(waiter)) is not None:
            fn, environ, protocol, done = job
            try:
                fn(environ, protocol)
            finally:
                try:
                    done.get_loop().call_soon_threadsafe(_resolve, done)
                except RuntimeError:   # the loop closed (shutdown): nobody waits
                    pass


class _Waiter:
    """An idle handler thread: it sleeps on ``wake`` (held while it waits) until a job is set."""
    __slots__ = ("wake", "job")

    def __init__(self):
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job = None


def _resolve(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)


class _BufferFull(Exception):
    pass


def _no_write(data: bytes) -> None:
    raise RuntimeError("the WSGI write() callable is not supported: return the body instead")
