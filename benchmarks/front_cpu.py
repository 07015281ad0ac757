"""Server CPU per request of the HTTP front alone, for this checkout and others, in one run.

    python benchmarks/front_cpu.py --bundle bundles/digits --repo . --repo /path/to/older/checkout --rounds 2

Each checkout's ``python -m server`` answers N ``POST /predict`` with a 32 KB body that is not an image
(415 once the body is read: the front, the raw-body fast path and an error answer; no decoding, no
model), over keep-alive connections at each --concurrency. Reported: CPU seconds of the server's
process group (utime + stime from /proc) per request, and requests/s. Checkouts alternate within each
round so that a shared machine's load drift hits them alike. The last line is the JSON summary.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slow_clients import start_server, wait_ready  # noqa: E402
from serve import free_port  # noqa: E402


def group_cpu_s(pgid: int) -> float:
    total = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:   # fields[2]: process group; [11], [12]: utime, stime in ticks
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def load(port: int, n: int, concurrency: int, body: bytes) -> None:
    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(k):
            conn.request("POST", "/predict", body, {"Content-Type": "image/png"})
            r = conn.getresponse()
            r.read()
            if r.status != 415:
                raise SystemExit(f"expected 415, got {r.status}")

    threads = [threading.Thread(target=client, args=(n // concurrency,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(repo: Path, bundle: str, n: int, concurrency: list[int]) -> list[dict]:
    port = free_port()
    proc = start_server(repo, bundle, port, [])
    body = os.urandom(32768)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        load(port, 200, 1, body)   # warm-up
        rows = []
        for c in concurrency:
            c0, t0 = group_cpu_s(proc.pid), time.perf_counter()
            load(port, n, c, body)
            cpu, wall = group_cpu_s(proc.pid) - c0, time.perf_counter() - t0
            rows.append({"repo": str(repo), "concurrency": c, "cpu_ms_per_request": 1000 * cpu / n, "rps": n / wall})
        return rows
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--repo", type=Path, action="append", default=[], help="checkout to measure (repeat)")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    repos = [r.resolve() for r in a.repo] or [Path(__file__).resolve().parent.parent]
    rows = []
    for rnd in range(a.rounds):
        for repo in repos:
            for r in measure(repo, a.bundle, a.requests, a.concurrency):
                rows.append({**r, "round": rnd})
                print(f"| {repo} | round {rnd} | c={r['concurrency']} | {r['cpu_ms_per_request']:.3f} ms CPU/request "
                      f"| {r['rps']:.0f} req/s |", flush=True)
    print(json.dumps({"requests": a.requests, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
