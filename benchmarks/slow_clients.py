"""Slow-client benchmark: normal requests and health probes while hundreds of connections trickle their
headers or bodies, against one ``python -m server`` on loopback.

    python benchmarks/slow_clients.py --bundle bundles/digits
    python benchmarks/slow_clients.py --bundle bundles/digits --slow-body 500 --slow-header 500 --seconds 20
    python benchmarks/slow_clients.py --bundle bundles/digits --repo /path/to/older/checkout   # the same on older code

Two phases, same server, same closed-loop load (``--concurrency`` keep-alive clients posting one JPEG):
1. idle: the load alone for ``--seconds``;
2. held: ``--slow-body`` connections that send complete ``POST /predict`` headers (Content-Length 1 MB)
   and then one body byte every ``--interval`` seconds, and ``--slow-header`` connections that send a
   request line and then one header byte every ``--interval`` seconds, all opened first; each one
   that the server cuts (408 or a closed connection) is counted and reopened at once, so that many
   stay open for the whole phase (what an attacker does). The load runs for ``--seconds`` on top.
Throughout phase 2 a prober GETs /v2/health/live and /v2/health/ready every 0.25 s.

Reported: p50/p99 of the normal requests in each phase and their ratio (target: held p99 <= 2x idle
p99), errors, the slowest probe answer (target: < 1 s), and how the slow connections ended (408,
closed, other answers, still open at the end) with the longest time one stayed open. Nothing leaves
127.0.0.1; every socket has a timeout and the run stops by itself after about 2 x --seconds plus
start-up. The open-file soft limit of this process is raised to fit the sockets (the server raises its
own from --max-connections). The last line of output is the JSON summary.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, make_image  # noqa: E402  (the same photo-sized JPEG as the serving benchmark)


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def start_server(repo: Path, bundle: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(repo / "python"), str(repo), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "server", "--bundle", bundle, "--port", str(port),
                             "--log-level", "WARNING", *extra], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server was not ready in time")


# -- the normal load: closed loop, one keep-alive connection per client -----------------------------
def normal_load(port: int, body: bytes, concurrency: int, seconds: float, timeout_s: float) -> dict:
    lat, errors, stop = [], [0], time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        conn = None
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
                conn.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except OSError:
                ok, conn = False, None
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                (lat.append(dt) if ok else None)
                errors[0] += not ok
            if not ok:
                time.sleep(0.05)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout_s + 5)
    a = np.asarray(lat)
    stat = (lambda f: float(f(a))) if lat else (lambda f: None)   # None: no request was answered
    return {"requests": len(lat), "errors": errors[0], "rps": len(lat) / seconds,
            "p50_ms": stat(lambda v: np.percentile(v, 50)), "p99_ms": stat(lambda v: np.percentile(v, 99)),
            "max_ms": stat(np.max)}


def prober(port: int, stop: threading.Event, out: dict) -> None:
    """GET liveness and readiness every 0.25 s: the slowest answer and the failures (timeout 5 s)."""
    while not stop.is_set():
        for path in ("/v2/health/live", "/v2/health/ready"):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            dt = (time.perf_counter() - t0) * 1000
            out["probes"] += 1
            out["probe_failures"] += not ok
            out["probe_max_ms"] = max(out["probe_max_ms"], dt)
        stop.wait(0.25)


# -- the slow connections: one asyncio loop in a thread ------------------------------------------
SLOW_BODY_HEAD = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 1000000\r\n\r\n")
SLOW_HEADER_HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class SlowClients:
    """The slow connections, in a process of their own (their loop must not take this process' GIL
    from the load and the prober, whose latencies are measured)."""

    def __init__(self, port: int, n_body: int, n_header: int, interval_s: float):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.ready, self.done = ctx.Event(), ctx.Event()
        self.open_now = ctx.Value("i", 0)
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=_slow_main, args=(port, n_body, n_header, interval_s, self.ready, self.done,
                                                          self.open_now, self.results), daemon=True)

    def start(self, wait_s: float = 120) -> None:
        self.proc.start()
        self.ready.wait(wait_s)

    def finish(self) -> dict:
        self.done.set()
        try:
            return self.results.get(timeout=60)
        finally:
            self.proc.join(10)


def _slow_main(port, n_body, n_header, interval_s, ready, done, open_now, results) -> None:
    state = _SlowState(port, n_body, n_header, interval_s, open_now)
    asyncio.run(state.main(ready, done))
    results.put({"ended": state.ended, "opened": state.opened, "longest_s": state.longest_s})


class _SlowState:
    def __init__(self, port: int, n_body: int, n_header: int, interval_s: float, open_now):
        self.port, self.n_body, self.n_header, self.interval_s = port, n_body, n_header, interval_s
        self.ended = {"408": 0, "closed": 0, "other": 0}
        self.open_now = open_now   # shared with the parent
        self.opened = 0
        self.longest_s = 0.0
        self.stop = None

    async def main(self, ready, done) -> None:
        self.stop = asyncio.Event()
        raise_fd_limit(self.n_body + self.n_header + 256)
        opened = asyncio.Semaphore(64)   # connect 64 at a time: the listen backlog is not the point here
        tasks = [asyncio.create_task(self._one(SLOW_BODY_HEAD + b"x", opened)) for _ in range(self.n_body)]
        tasks += [asyncio.create_task(self._one(SLOW_HEADER_HEAD + b"X", opened)) for _ in range(self.n_header)]
        end = time.monotonic() + 60
        while self.open_now.value < self.n_body + self.n_header and time.monotonic() < end:
            await asyncio.sleep(0.1)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.2)
        self.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, head: bytes, opened: asyncio.Semaphore) -> None:
        while not self.stop.is_set():
            try:
                async with opened:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
                writer.write(head)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.5)
                continue
            self.open_now.value += 1
            self.opened += 1
            t0 = time.monotonic()
            answer = asyncio.create_task(reader.read(4096))
            try:
                while True:
                    done, _ = await asyncio.wait([answer], timeout=self.interval_s)
                    if done:
                        break
                    writer.write(b"x")   # one more byte of the body, or of a header name
                    await writer.drain()
                data = answer.result()
                kind = "closed" if not data else "408" if data.startswith(b"HTTP/1.1 408") else "other"
            except (OSError, asyncio.IncompleteReadError):
                kind = "closed"
            except asyncio.CancelledError:   # the end of the run: still open
                answer.cancel()
                writer.close()
                self.open_now.value -= 1
                raise
            self.longest_s = max(self.longest_s, time.monotonic() - t0)
            self.ended[kind] += 1
            self.open_now.value -= 1
            writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose server runs (default: this one)")
    p.add_argument("--slow-body", type=int, default=500)
    p.add_argument("--slow-header", type=int, default=500)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between the bytes of a slow client")
    p.add_argument("--concurrency", type=int, default=4, help="normal clients (closed loop)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--request-timeout", type=float, default=30.0, help="normal request timeout (then an error)")
    p.add_argument("--server-args", default="", help="extra flags for python -m server")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "slow_clients.json")
    a = p.parse_args(argv)
    if a.slow_body + a.slow_header > 5000:
        p.error("at most 5000 slow connections (a loopback benchmark, not a load generator)")
    limit = raise_fd_limit(a.slow_body + a.slow_header + a.concurrency + 256)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(a.repo, a.bundle, port, a.server_args.split())
    body = make_image()
    try:
        wait_ready(url, proc)
        normal_load(port, body, a.concurrency, 2.0, a.request_timeout)   # warm-up
        idle = normal_load(port, body, a.concurrency, a.seconds, a.request_timeout)
        slow = SlowClients(port, a.slow_body, a.slow_header, a.interval)
        slow.start()
        opened_at_start = slow.open_now.value
        probes = {"probes": 0, "probe_failures": 0, "probe_max_ms": 0.0}
        stop = threading.Event()
        pt = threading.Thread(target=prober, args=(port, stop, probes), daemon=True)
        pt.start()
        held = normal_load(port, body, a.concurrency, a.seconds, a.request_timeout)
        open_at_end = slow.open_now.value
        stop.set()
        pt.join(10)
        ended = slow.finish()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    result = {"repo": str(a.repo), "bundle": a.bundle, "server_args": a.server_args, "fd_soft_limit": limit,
              "slow_body": a.slow_body, "slow_header": a.slow_header, "interval_s": a.interval,
              "concurrency": a.concurrency, "seconds": a.seconds, "idle": idle, "held": held,
              "p99_ratio": held["p99_ms"] / idle["p99_ms"] if held["p99_ms"] and idle["p99_ms"] else None, **probes,
              "slow_open_at_start": opened_at_start, "slow_open_at_end": open_at_end,
              "slow_opened": ended["opened"], "slow_ended": ended["ended"], "slow_longest_s": ended["longest_s"]}
    print(f"| phase | requests | errors | req/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|")
    ms = lambda v: "-" if v is None else f"{v:.1f}"   # noqa: E731
    for name, r in (("idle", idle), (f"held ({a.slow_body} slow bodies + {a.slow_header} slow headers)", held)):
        print(f"| {name} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {ms(r['p50_ms'])} | {ms(r['p99_ms'])} "
              f"| {ms(r['max_ms'])} |")
    print(f"held p99 / idle p99: {ms(result['p99_ratio'])} (target <= 2; -: no request answered)")
    print(f"probes: {probes['probes']}, failed {probes['probe_failures']}, slowest {probes['probe_max_ms']:.0f} ms "
          f"(target < 1000)")
    e = ended["ended"]
    print(f"slow connections: {opened_at_start} open when the load started, {ended['opened']} opened in all; ended: "
          f"{e['408']} with 408, {e['closed']} closed, {e['other']} other answers; {open_at_end} open at the end; "
          f"longest open {ended['longest_s']:.1f}s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
