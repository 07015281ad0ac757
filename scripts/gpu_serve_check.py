"""The service on a GPU: the embedded server and a Redis GPU worker answer like the CPU (part of the GPU check).

    python scripts/gpu_serve_check.py --bundle bundles/gpu-digits --images data/digits/val --device cuda \
        --out /tmp/gpu_check/serve

1. embedded: ``python -m server --bundle B --device cuda`` answers every image with the same top-1
   as ``export.load_bundle(B)`` on the CPU; ``/v2/models/<name>`` and ``/metrics`` are saved and must
   name CUDA (the provider actually used);
2. redis: ``redis-server`` + ``python -m server.worker --device cuda`` + a front: the same answers;
3. a worker asked for a CUDA device this machine does not have exits at start-up with a message
   naming the device, instead of serving from the CPU.
Exit 0 when all hold; each failure is printed. Processes are started here and always stopped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)


def wait_ready(url: str, procs: list[subprocess.Popen], seconds: float = 180) -> None:
    from server.client import Client

    client, deadline = Client(url), time.time() + seconds
    while not client.ready():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.time() > deadline:
            raise RuntimeError(f"{url} not ready ({'exited: ' + str(dead) if dead else 'timed out'})")
        time.sleep(0.3)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def answers(url: str, images: list[str]) -> list[str]:
    from server.client import Client

    client = Client(url, timeout=60)
    return [client.predict(p, topk=1)["predictions"][0]["labels"][0] for p in images]


def check_service(name: str, url: str, images: list[str], expected: list[str], out: Path, model: str,
                  device: str) -> list[str]:
    problems = []
    got = answers(url, images)
    agree = sum(a == b for a, b in zip(got, expected)) / len(expected)
    print(f"{name}: top-1 agrees with the CPU on {100 * agree:.1f}% of {len(images)} images")
    if agree < 0.99:
        problems.append(f"{name}: top-1 agrees with the CPU on only {100 * agree:.1f}% of the images")
    meta = get(f"{url}/v2/models/{model}")
    (out / f"{name}_model.json").write_text(meta)
    metrics = get(f"{url}/metrics")
    (out / f"{name}_metrics.txt").write_text(metrics)
    for what, text in (("/v2/models", meta), ("/metrics", metrics)):
        if device != "cpu" and "cuda" not in text.lower():
            problems.append(f"{name}: {what} does not name CUDA (the provider actually used must be reported)")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from export import load_bundle

    every = sorted(str(x) for x in Path(a.images).rglob("*.png"))
    images = every[:: max(1, len(every) // a.count)][: a.count]  # spread over the classes
    cpu = load_bundle(a.bundle)
    expected = cpu.predict(images, topk=1).top1
    model = cpu.manifest["name"]
    problems, procs = [], []
    try:
        port = free_port()
        dev = [] if a.device == "cpu" else ["--device", a.device]  # cpu: a dry run of this script anywhere
        procs.append(start(["-m", "server", "--bundle", a.bundle, *dev, "--port", str(port), "--log-level", "WARNING"],
                           out / "embedded_server.log"))
        wait_ready(f"http://127.0.0.1:{port}", procs)
        problems += check_service("embedded", f"http://127.0.0.1:{port}", images, expected, out, model, a.device)
        embedded = procs.pop()
        embedded.terminate()
        embedded.wait(timeout=30)

        if not shutil.which("redis-server"):
            problems.append("redis: redis-server is not installed here; the Redis GPU worker was not checked")
        else:
            rport, port = free_port(), free_port()
            redis_url = f"redis://127.0.0.1:{rport}/0"
            procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                                          stdout=(out / "redis.log").open("w"), stderr=subprocess.STDOUT))
            procs.append(start(["-m", "server.worker", "--redis-url", redis_url, "--bundle", a.bundle, *dev,
                                "--log-level", "WARNING"], out / "redis_worker.log"))
            procs.append(start(["-m", "server", "--redis-url", redis_url, "--bundle", a.bundle, "--port", str(port),
                                "--log-level", "WARNING"], out / "redis_front.log"))
            wait_ready(f"http://127.0.0.1:{port}", procs)
            problems += check_service("redis", f"http://127.0.0.1:{port}", images, expected, out, model, a.device)
        if shutil.which("redis-server") and a.device != "cpu":
            bad = subprocess.run([sys.executable, "-m", "server.worker", "--redis-url", redis_url, "--bundle", a.bundle,
                                  "--device", "cuda:99"], capture_output=True, text=True, timeout=60, cwd=ROOT)
            (out / "worker_cuda99.log").write_text(bad.stdout + bad.stderr)
            if bad.returncode == 0 or "cuda:99" not in bad.stderr:
                problems.append("worker --device cuda:99 did not fail at start-up with a message naming the device")
    except Exception as exc:  # noqa: BLE001 - reported as a failed check, with the logs under --out
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    for line in problems:
        print(f"FAIL {line}")
    (out / "serve_check.json").write_text(json.dumps({"problems": problems, "images": len(images)}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
