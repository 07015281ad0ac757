"""What granian's interfaces cost a lone request before any app work: latency of a keep-alive ``POST`` with a
20 KB body, one client, against apps that do nothing, in one run.

    python benchmarks/granian_floor.py --requests 3000 --rounds 2

- ``wsgi``: granian's WSGI interface (the app reads ``wsgi.input`` on a blocking thread and answers);
- ``rsgi``: its RSGI interface, the body awaited on the asyncio loop and the answer sent from there;
- ``rsgi-no-body``: the same without reading the body (what the body's round trip through the loop costs;
  granian may close a connection whose body was not read: the request is then not counted, the
  connection reopened, and the count of those reported);
- ``front``: ``server.buffered.BufferedFront`` around the WSGI app (what ``python -m server`` runs: the body
  read on the loop against its deadline, the app on a handler thread).

The difference between ``wsgi`` and ``rsgi`` is granian's own, paid by any RSGI app; ``front`` minus
``rsgi`` is this project's. Servers alternate within each round. The last line is the JSON summary.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from serve import free_port  # noqa: E402
from slow_clients import wait_ready  # noqa: E402

ANSWER = b'{"ok":true}\n'
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))]


def wsgi_app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", HEADERS)
    return [ANSWER]


async def rsgi_app(scope, protocol):
    await protocol()
    protocol.response_bytes(200, HEADERS, ANSWER)


async def rsgi_no_body(scope, protocol):
    protocol.response_bytes(200, HEADERS, ANSWER)


def _front():
    from server.buffered import BodyPolicy, BufferedFront
    return BufferedFront(wsgi_app, BodyPolicy(), threads=64)


APPS = {"wsgi": ("wsgi", "wsgi_app"), "rsgi": ("rsgi", "rsgi_app"), "rsgi-no-body": ("rsgi", "rsgi_no_body"),
        "front": ("rsgi", "front")}


def __getattr__(name):   # granian imports "granian_floor:front" in its worker: built there, not at import
    if name == "front":
        return _front()
    raise AttributeError(name)


def measure(name: str, requests: int, warmup: int) -> dict:
    interface, target = APPS[name]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), str(ROOT / "python")]))
    proc = subprocess.Popen([sys.executable, "-m", "granian", "--interface", interface, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--http", "1", "--no-ws",
                             "--blocking-threads", "64" if interface == "wsgi" else "1", f"granian_floor:{target}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    body = os.urandom(20_000)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=30)   # these apps answer 200 on any path
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        lat, reopened = [], 0
        while len(lat) < requests + warmup:
            t = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                r.read()
            except (http.client.HTTPException, ConnectionError):
                # rsgi-no-body: an answer sent before the body was read may end the connection (hyper
                # closes it rather than read a body nobody asked for); that request is not counted
                reopened += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            if r.status != 200:
                raise SystemExit(f"{name}: HTTP {r.status}")
            lat.append(time.perf_counter() - t)
        lat = sorted(lat[warmup:])
        return {"server": name, "mean_ms": 1e3 * statistics.mean(lat), "p50_ms": 1e3 * lat[len(lat) // 2],
                "p99_ms": 1e3 * lat[int(len(lat) * 0.99)], "reopened": reopened}
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--servers", nargs="+", default=list(APPS), choices=list(APPS))
    a = p.parse_args(argv)
    rows = []
    for rnd in range(a.rounds):
        for name in (a.servers if rnd % 2 == 0 else a.servers[::-1]):
            r = {**measure(name, a.requests, a.warmup), "round": rnd}
            rows.append(r)
            print(f"| {name} | round {rnd} | mean {r['mean_ms']:.3f} ms | p50 {r['p50_ms']:.3f} ms "
                  f"| p99 {r['p99_ms']:.3f} ms | connections reopened {r['reopened']} |", flush=True)
    print(json.dumps({"requests": a.requests, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
