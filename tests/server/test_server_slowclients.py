"""Slow clients: a body that does not arrive in time is cut with 408 before it holds a handler thread,
and while many slow connections are held a normal request and the health probes are answered.

Unit tests drive ``server.buffered.BufferedFront`` (the RSGI front granian runs) with a scripted
protocol: the stalls are forced (a chunk that never comes, an app blocked on an event), and every
assertion is on an answer, never on a latency. One end-to-end test runs ``python -m server`` with small
timeouts and 200 slow connections against 2 handler threads (granian's WSGI interface held them all).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest

from server.app import create_app
from server.buffered import SMALL_BODY, BodyPolicy, BufferedFront, HandlerThreads
from server.config import ServerConfig
from server.front import DrainState
from server_fixtures import digit_images, digits_bundle, make_fake_model, png_bytes  # noqa: F401


class Scope:
    proto, http_version, scheme, server, client, authority, query_string = \
        "http", "1.1", "http", "127.0.0.1:8000", "127.0.0.1:5555", None, ""

    def __init__(self, method: str, path: str, headers: dict):
        self.method, self.path = method, path
        self.headers = {k.lower(): v for k, v in headers.items()}


class Protocol:
    """granian's RSGIHTTPProtocol as BufferedFront uses it: chunks then a stall (``stall``: the next
    chunk never comes), and the answer recorded (from a handler thread or the loop)."""

    def __init__(self, chunks: list[bytes], stall: bool = False):
        self.chunks, self.stall = list(chunks), stall
        self.answered = threading.Event()
        self.status = self.headers = self.body = None

    def __call__(self):   # the whole body in one read (BufferedFront's path for small declared lengths)
        return self._collect()

    async def _collect(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.stall:
            await asyncio.Event().wait()   # a client that sent part of its body and nothing more
        raise StopAsyncIteration

    def response_bytes(self, status: int, headers: list, body: bytes) -> None:
        self.status, self.headers, self.body = status, dict(headers), body
        self.answered.set()


def _app(**cfg):
    return create_app(ServerConfig(max_delay_ms=1, **cfg), models=[make_fake_model()])


def _post(front, body_chunks, stall=False, headers=None, path="/predict"):
    headers = {"Content-Type": "image/png", **(headers or {})}
    if "Transfer-Encoding" not in headers:
        headers.setdefault("Content-Length", str(sum(map(len, body_chunks)) + (100 if stall else 0)))
    proto = Protocol(body_chunks, stall)
    return Scope("POST", path, headers), proto


@pytest.mark.parametrize("headers", [{}, {"Content-Length": str(SMALL_BODY + 1)}, {"Transfer-Encoding": "chunked"}],
                         ids=["small-declared", "large-declared", "chunked"])
def test_a_stalled_body_is_cut_with_408_and_no_thread_runs_for_it(headers):
    """Both read paths: a small declared body in one read, a large or chunked one chunk by chunk."""
    calls = []
    front = BufferedFront(lambda env, sr: calls.append(env) or [], BodyPolicy(timeout_s=0.2, min_rate=1_000_000), 1)
    scope, proto = _post(front, [b"\x89PNG"], stall=True, headers=headers)
    asyncio.run(front.__rsgi__(scope, proto))
    assert proto.status == 408 and proto.headers["Connection"] == "close"
    err = json.loads(proto.body)
    assert err["status"] == 408 and "--body-timeout-s" in err["error"] and "--body-min-rate" in err["error"]
    assert calls == [] and front.cut == 1 and front.buffered == 0


def test_a_body_that_keeps_the_minimum_rate_is_not_cut():
    """Each chunk adds chunk/min_rate seconds: 20 chunks of 1000 bytes, 0.05 s apart, take 1 s against a
    0.3 s body timeout, and are read in full (the app gets every byte)."""
    got = []

    class Trickle(Protocol):
        async def __anext__(self):
            if self.chunks:
                await asyncio.sleep(0.05)
            return await super().__anext__()

    def app(env, start_response):
        got.append(env["wsgi.input"].read())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    front = BufferedFront(app, BodyPolicy(timeout_s=0.3, min_rate=1000), 1)
    chunks = [bytes([i]) * 1000 for i in range(20)]
    proto = Trickle(chunks)   # chunked: read chunk by chunk, each chunk moving the deadline
    asyncio.run(front.__rsgi__(Scope("POST", "/x", {"Transfer-Encoding": "chunked"}), proto))
    assert proto.status == 200 and got == [b"".join(bytes([i]) * 1000 for i in range(20))]


def test_answers_equal_the_wsgi_app_and_limits_are_the_apps():
    """Same bytes as the app's own WSGI answer: the fast path, Flask, a declared length over
    --max-request-bytes (413, body never read) and a chunked body over it (413 after limit + 1 bytes)."""
    app = _app(max_request_bytes=50_000)
    front = BufferedFront(app, BodyPolicy(max_request_bytes=50_000), 2)
    img = png_bytes()

    async def run(scope, proto):
        await front.__rsgi__(scope, proto)
        return proto

    p = asyncio.run(run(*_post(front, [img[:100], img[100:]])))
    assert p.status == 200 and json.loads(p.body)["predictions"][0]["labels"] and "X-Request-ID" in p.headers
    p = asyncio.run(run(Scope("GET", "/v2/health/live", {}), Protocol([])))
    assert p.status == 200 and json.loads(p.body) == {"live": True}
    odd = Scope("GET", "/models", {})
    odd.query_string = "model=\u1e7f"   # raw UTF-8 in the query: granian gives str, WSGI wants latin-1 (was a 500)
    p = asyncio.run(run(odd, Protocol([])))
    assert p.status == 200, p.body
    big = Protocol([b"x" * 10], stall=True)   # declared too large: answered without reading (no stall)
    p = asyncio.run(run(Scope("POST", "/predict", {"Content-Type": "image/png", "Content-Length": "60000"}), big))
    assert p.status == 413 and "--max-request-bytes" in json.loads(p.body)["error"] and big.chunks == [b"x" * 10]
    chunked = Protocol([b"x" * 30_000] * 3, stall=True)
    p = asyncio.run(run(Scope("POST", "/predict", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}),
                        chunked))
    assert p.status == 413 and chunked.chunks == [b"x" * 30_000] and front.buffered == 0


def test_bodies_held_at_once_are_bounded():
    front = BufferedFront(lambda e, s: [], BodyPolicy(max_request_bytes=1000, max_buffered_bytes=1500), 1)
    front.buffered = 1000   # another body's bytes are held
    scope, proto = _post(front, [b"x" * 600])
    asyncio.run(front.__rsgi__(scope, proto))
    assert proto.status == 503 and proto.headers["Retry-After"] == "1" and front.buffered == 1000


def test_probes_are_answered_while_every_handler_thread_is_held():
    """Both handler threads wait inside the app (forced with an event); liveness and readiness are
    still answered (their own thread), and the requests in flight are counted for the drain."""
    release, inside = threading.Event(), threading.Semaphore(0)
    app = _app()

    def blocking(env, start_response):
        if env["PATH_INFO"] == "/predict":
            inside.release()
            release.wait(30)
        return app(env, start_response)

    pending = DrainState()
    front = BufferedFront(blocking, BodyPolicy(), 2, pending)

    async def scenario():
        held = [Protocol([png_bytes(seed=i)]) for i in range(3)]   # 2 in threads, 1 queued for one
        tasks = [asyncio.create_task(front.__rsgi__(*_post(front, p.chunks)[:1], p)) for p in held]
        for _ in range(2):
            assert await asyncio.to_thread(inside.acquire, True, 30)
        probes = [Protocol([]), Protocol([])]
        await asyncio.wait_for(asyncio.gather(front.__rsgi__(Scope("GET", "/v2/health/live", {}), probes[0]),
                                              front.__rsgi__(Scope("GET", "/v2/health/ready", {}), probes[1])), 30)
        in_flight = pending.in_flight
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return probes, held, in_flight

    probes, held, in_flight = asyncio.run(scenario())
    assert [p.status for p in probes] == [200, 200] and json.loads(probes[1].body)["ready"] is True
    assert in_flight == 3 and pending.in_flight == 0
    assert [p.status for p in held] == [200, 200, 200]


class _Done:
    """The asyncio future a handler thread resolves, without a loop: records the resolution."""

    def __init__(self):
        self.resolved = threading.Event()

    def get_loop(self):
        return self

    def call_soon_threadsafe(self, fn, done):
        self.resolved.set()


def _idle_threads(pool: HandlerThreads, n: int) -> bool:
    """Wait (30 s at most) until ``n`` threads wait for a job: a thread resolves its job before it goes idle."""
    deadline = time.monotonic() + 30
    while len(pool._idle) < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _run(pool: HandlerThreads, fn) -> None:
    done = _Done()
    pool.put((fn, {}, None, done))
    assert done.resolved.wait(30)


def test_a_job_goes_to_the_thread_that_became_idle_last():
    """Two threads are held inside jobs (events) and let go one after the other: the next job runs on
    the one let go last, and so does every job after it while they come one at a time (a shared queue
    handed them to whichever thread it woke; round-robin over 64 threads cost a lone request 0.35-0.5 ms)."""
    pool = HandlerThreads(2, "t")
    names, inside, release = [None, None], threading.Semaphore(0), [threading.Event(), threading.Event()]

    def held(i):
        def fn(environ, protocol):
            names[i] = threading.current_thread().name
            inside.release()
            release[i].wait(30)
        return fn

    dones = [_Done(), _Done()]
    for i in range(2):
        pool.put((held(i), {}, None, dones[i]))
    assert inside.acquire(timeout=30) and inside.acquire(timeout=30)
    for i in range(2):   # the thread in job 0 goes idle first, then the one in job 1
        release[i].set()
        assert dones[i].resolved.wait(30) and _idle_threads(pool, i + 1)
    ran = []
    for _ in range(5):
        _run(pool, lambda environ, protocol: ran.append(threading.current_thread().name))
    assert len(set(names)) == 2 and ran == [names[1]] * 5, (names, ran)
    pool.close()
    for t in pool.threads:
        t.join(30)
    assert not any(t.is_alive() for t in pool.threads)


def test_jobs_that_find_no_idle_thread_run_in_arrival_order():
    pool = HandlerThreads(1, "t")
    inside, release, order = threading.Event(), threading.Event(), []

    def held(environ, protocol):
        inside.set()
        release.wait(30)

    pool.put((held, {}, None, _Done()))
    assert inside.wait(30)
    dones = [_Done() for _ in range(4)]
    for i, done in enumerate(dones):
        pool.put((lambda environ, protocol, i=i: order.append(i), {}, None, done))
    release.set()
    assert all(d.resolved.wait(30) for d in dones) and order == [0, 1, 2, 3]
    pool.close()


# -- python -m server, granian, real sockets ---------------------------------------------------------
SLOW_BODY = 150
SLOW_HEADER = 50


def _slow_socket(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.slow
def test_slow_connections_do_not_take_the_service(digits_bundle, tiny_digits):
    """2 handler threads, 150 connections that sent headers and part of a body, 50 that sent part of
    their headers: a normal request and both probes are answered 200 while they are held, then every
    slow body gets 408 and a closed connection after --body-timeout-s, every slow header a closed one.
    (Before: granian's WSGI interface gave each body to a thread that waited for it, and its connection
    count was --http-threads, so the normal request waited for the slow ones.)"""
    from test_server_process import _start, _stop

    proc, url = _start("--bundle", str(digits_bundle), "--http-threads", "2", "--body-timeout-s", "3",
                       "--body-min-rate", "1000", "--header-timeout-s", "3")
    port = int(url.rsplit(":", 1)[1])
    slow_body = slow_header = []
    try:
        slow_body = [_slow_socket(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                        b"Content-Length: 100000\r\n\r\n\x89PNG") for _ in range(SLOW_BODY)]
        slow_header = [_slow_socket(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Typ")
                       for _ in range(SLOW_HEADER)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for path in ("/v2/health/live", "/v2/health/ready"):
            conn.request("GET", path)
            r = conn.getresponse()
            assert r.status == 200, (path, r.read())
            r.read()
        conn.request("POST", "/predict", body=digit_images(tiny_digits, 1)[0].read_bytes(),
                     headers={"Content-Type": "image/png"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["predictions"][0]["labels"]
        for s in slow_body:   # 408, then the server closes (recv returns b"" by its deadline)
            answer = _read_all(s)
            assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in answer, answer[:200]
        for s in slow_header:
            assert _read_all(s) == b""
    finally:
        for s in slow_body + slow_header:
            s.close()
        assert _stop(proc) == 0


@pytest.mark.parametrize("flag,value", [("--body-timeout-s", "0"), ("--body-min-rate", "0"), ("--header-timeout-s", "61"),
                                        ("--header-timeout-s", "0"), ("--max-connections", "0")])
def test_slow_client_flags_are_validated(flag, value, capsys):
    from server.__main__ import main

    assert main(["--bundle", "no-such-bundle", flag, value]) == 2
    assert flag in capsys.readouterr().err
