"""Memory under a burst of large images: peak and after-burst RSS of the serving process.

    python benchmarks/memory.py --bundle bundles/digits
    python benchmarks/memory.py --bundle bundles/digits --concurrency 16 64 --server-args "--max-decode-memory 1G"

Starts ``python -m server`` (granian front, embedded mode) on a free loopback port, warms it up
with one small request, reads the serving process's idle RSS, then sends --concurrency requests at
once (after the same number of small requests at once, so the idle figure includes every
thread the burst needs), each a --size x --size PNG (a simple pattern: ~100 kB on the wire, --size^2 pixels decoded).
Reported per burst: the answers by status code, the serving process's peak RSS (the kernel's
VmHWM, so no sampling can miss it), its RSS right after the burst and --settle seconds later, and
the ratio of the latter to the idle figure. The serving process is granian's worker (a child of
the ``python -m server`` process), or the server process itself with ``--http werkzeug``.
JSON goes to benchmarks/results/memory.json; the last line of output is the JSON summary.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pattern_png(size: int, seed: int = 0) -> bytes:
    """A size x size RGB PNG of stripes: every pixel decoded, ~100 kB encoded at 6000 px."""
    from PIL import Image

    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, :, 0] = (np.arange(size) % 256)[None, :]
    arr[:: 7 + seed % 5, :, 1] = 200
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def small_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def serving_pid(server: subprocess.Popen) -> int:
    """granian serves from a child process of ``python -m server``; werkzeug from the process itself."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == server.pid:
                kids.append(int(entry))
    return max(kids, key=lambda pid: proc_status(pid)["VmRSS"]) if kids else server.pid


def post(url: str, body: bytes, timeout: float) -> int:
    req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code
    except OSError:   # reset or timed out: counted as "error", never silently dropped
        return 0


def burst(url: str, bodies: list[bytes], timeout: float) -> dict[str, int]:
    """Every body sent at once (a barrier releases the threads together) -> {status: count}."""
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(bodies))

    def one(body: bytes) -> None:
        barrier.wait()
        code = post(url, body, timeout)
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts: dict[str, int] = {}
    for code in statuses:
        counts[str(code) if code else "error"] = counts.get(str(code) if code else "error", 0) + 1
    return counts


def start_server(bundle: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "server", "--bundle", bundle, "--port", str(port),
                             "--log-level", "WARNING", *extra], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready after 120 s")


def settle_rss(pid: int, bound: float, seconds: float) -> tuple[float, int]:
    """Poll RSS until it is under ``bound`` or ``seconds`` pass -> (seconds waited, last RSS)."""
    t0 = time.time()
    while True:
        rss = proc_status(pid)["VmRSS"]
        waited = time.time() - t0
        if rss < bound or waited >= seconds:
            return waited, rss
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64])
    p.add_argument("--size", type=int, default=6000, help="side of each square PNG (6000: 36 megapixels)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the burst for RSS to come back")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    p.add_argument("--server-args", default="", help="extra flags for python -m server (one string)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory.json"))
    a = p.parse_args(argv)

    bodies = [pattern_png(a.size, seed) for seed in range(5)]
    print(f"{a.size}x{a.size} PNG: {len(bodies[0]) / 1e3:.0f} kB encoded, {a.size * a.size / 1e6:.0f} MP")
    results = []
    for n in a.concurrency:   # a fresh server per burst: each starts from the same idle state
        proc, url = start_server(a.bundle, shlex.split(a.server_args))
        try:
            pid = serving_pid(proc)
            warm = burst(url, [small_png()] * n, a.timeout)   # as many threads as the burst, small images
            time.sleep(1.0)
            idle = proc_status(pid)["VmRSS"]
            t0 = time.time()
            counts = burst(url, [bodies[i % len(bodies)] for i in range(n)], a.timeout)
            took = time.time() - t0
            st = proc_status(pid)
            waited, settled = settle_rss(pid, 1.2 * idle, a.settle)
            row = {"concurrency": n, "statuses": counts, "warm_up_statuses": warm, "burst_s": round(took, 2),
                   "idle_rss_mib": round(idle / 2**20), "peak_rss_mib": round(st["VmHWM"] / 2**20),
                   "after_burst_rss_mib": round(st["VmRSS"] / 2**20), "settled_rss_mib": round(settled / 2**20),
                   "settled_after_s": round(waited, 1), "settled_over_idle": round(settled / idle, 2)}
        finally:
            proc.terminate()
            proc.wait(30)
        results.append(row)
        print(f"c={n}: {counts} in {took:.1f}s; RSS idle {row['idle_rss_mib']} MiB, peak {row['peak_rss_mib']} MiB, "
              f"after {row['after_burst_rss_mib']} MiB, {row['settled_rss_mib']} MiB {waited:.1f}s later "
              f"({row['settled_over_idle']}x idle)", flush=True)
    summary = {"size": a.size, "server_args": a.server_args, "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
