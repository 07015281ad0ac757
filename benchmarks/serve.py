"""Serving benchmark: closed-loop HTTP load against the embedded server, Redis mode with 1 and 2
workers, and a seed-style baseline (one Flask request = one unbatched model call), same bundle and
same image, in one run; plus the raw batched model throughput as the ceiling.

    python benchmarks/serve.py --bundle bundles/digits
    python benchmarks/serve.py --bundle bundles/mnv3 --concurrency 1 4 16 64 --seconds 8 --threads 2 --jpeg-draft
    python benchmarks/serve.py --bundle bundles/mnv3 --bundle bundles/resnet50 --defaults-vs-tuned --rounds 3 --seconds 12

The last form serves each bundle with no tuning flags (``defaults``: the server chooses its layout,
server/layout.py) next to the hand-tuned embedded layouts and prints defaults / best tuned req/s.

Every server runs in its own process(es), all started before the first measurement and paused
(SIGSTOP) except while measured; the load generator is this process (threads, one keep-alive
connection per simulated client). Cells run interleaved (for each
concurrency, every mode in turn), so a shared machine's load drift hits all modes alike. Each cell
warms up for --warmup seconds and then counts the requests that finish in the next --seconds. Reported: requests/s, p50/p95/p99 latency, the mean batch
size the server reports per request, and the ratio to the raw batched model throughput (images/s
of ``predict_tensor`` on preprocessed crops at the best batch size up to --max-batch, no HTTP, no
decoding). JSON goes
to benchmarks/results/serve.json and a latency plot to benchmarks/results/serve.png; the last line
of output is the JSON summary.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
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


def make_image(w: int = 500, h: int = 375, seed: int = 0) -> bytes:
    """A photo-sized JPEG with smooth structure (like a real photo, unlike pure noise)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC).filter(ImageFilter.DETAIL)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# -- the seed-style baseline server: one request, one decode, one unbatched model call ---------
def baseline_app(bundle: str, threads: int, preprocessing: str = "seed"):
    """What the seed's Flask server did per request: decode with PIL, resize and crop with
    torchvision's transforms on the PIL image, one unbatched model call, one at a time. The model
    input is our bundle's uint8 crop (normalisation is inside the graph, so the seed's ToTensor and
    Normalize steps are skipped: slightly cheaper than the seed). preprocessing="shared": our own
    decode_image + eval_transform instead, to separate what batching and the HTTP front buy from
    what the cheaper preprocessing buys."""
    from flask import Flask, jsonify, request

    from export import load_bundle

    model = load_bundle(bundle, threads=threads)
    spec = model.spec
    if preprocessing == "seed":
        from PIL import Image
        import torchvision.transforms.functional as TF

        def crop(data: bytes) -> np.ndarray:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            img = TF.center_crop(TF.resize(img, spec.resize_size), list(spec.crop_size))
            return np.asarray(img).transpose(2, 0, 1)[None]
    else:
        from trainer.data.images import decode_image
        from trainer.data.transforms import eval_transform

        def crop(data: bytes) -> np.ndarray:
            return eval_transform(decode_image(data), spec)[None].numpy()

    lock = threading.Lock()   # the seed ran one model call at a time
    app = Flask("baseline")

    @app.post("/predict")
    def predict():
        x = np.ascontiguousarray(crop(request.get_data()))
        with lock:
            probs = model.predict_tensor(x)[0]
        i = int(probs.argmax())
        return jsonify({"predictions": [{"labels": [model.classes[i]], "probabilities": [float(probs[i])]}],
                        "batch_size": 1})

    @app.get("/v2/health/ready")
    def ready():
        return jsonify({"ready": True})

    return app


def serve_baseline(bundle: str, port: int, threads: int, preprocessing: str) -> None:
    baseline_app(bundle, threads, preprocessing).run("127.0.0.1", port, threaded=True, debug=False,
                                                     use_reloader=False)


# -- processes ------------------------------------------------------------------------------
class Stack:
    """The processes of one mode; started, waited for readiness, stopped."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def spawn(self, *args: str, threads: int | None = 1) -> subprocess.Popen:
        """threads: OMP_NUM_THREADS for the process; None leaves the environment as it is (defaults mode)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")]))
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        p = subprocess.Popen(list(args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)   # its own process group: pause() reaches granian's worker
        self.procs.append(p)
        return p

    def _signal_groups(self, sig: int, exited_too: bool = False) -> None:
        for p in self.procs:
            if exited_too or p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def pause(self) -> None:
        """SIGSTOP every process of the stack: an idle server still wakes up (timers, heartbeats,
        Redis polls) and keeps its memory warm; stopped, it cannot disturb the mode being measured
        (resnet50 c=1 p50 was 5 ms slower with five idle stacks up than alone)."""
        self._signal_groups(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_groups(signal.SIGCONT)

    def wait_ready(self, url: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a process exited while starting: {[p.args for p in self.procs if p.poll() is not None]}")
            time.sleep(0.3)
        raise RuntimeError(f"{url} not ready after {timeout}s")

    def stop(self) -> None:
        self.resume()
        time.sleep(0.3)   # granian's parent ignored a SIGTERM that came right after SIGCONT (hung 10 s)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._signal_groups(signal.SIGKILL, exited_too=True)   # what a killed parent left behind (its workers)


def start_mode(mode: str, a, redis_url: str | None) -> tuple[Stack, str]:
    st, port = Stack(), free_port()
    url = f"http://127.0.0.1:{port}"
    py = sys.executable
    common = ["--bundle", a.bundle, "--max-delay-ms", str(a.max_delay_ms)]
    dev = ["--device", a.device]   # where our servers and workers run the model (the seed baselines: CPU)
    draft = ["--jpeg-draft"] if a.jpeg_draft else []
    if mode in ("defaults", "defaults-onnxruntime"):   # what a user gets: no --threads/--runners/--solo-threads/--max-batch
        # defaults-onnxruntime: the same with the backend pinned to onnxruntime fp32, the default before the
        # start-up backend choice (server/layout.py choose_backend); its layout is still chosen at start-up
        pin = ["--backend", "onnxruntime", "--precision", "fp32"] if mode == "defaults-onnxruntime" else []
        st.spawn(py, "-m", "server", "--bundle", a.bundle, *dev, *draft, *pin, "--port", str(port), "--max-queue",
                 "10000", "--log-level", "WARNING", *a.server_args.split(), threads=None)
    elif mode.startswith("baseline"):   # baseline: the seed's preprocessing; baseline-shared: ours
        st.spawn(py, __file__, "--serve-baseline", "seed" if mode == "baseline" else "shared", "--bundle", a.bundle,
                 "--port", str(port), "--threads", str(a.threads), threads=a.threads)
    elif mode.startswith("embedded"):   # embedded[-N][-bM][-werkzeug]: N runners sharing the threads, --max-batch M
        parts = mode.split("-")[1:]
        http = "werkzeug" if "werkzeug" in parts else "granian"
        runners = int(next((p for p in parts if p.isdigit()), 1))
        max_batch = next((p[1:] for p in parts if p[:1] == "b" and p[1:].isdigit()), str(a.max_batch))
        per = max(1, a.threads // runners)
        st.spawn(py, "-m", "server", *common, *dev, "--max-batch", max_batch, *draft, "--port", str(port), "--threads",
                 str(per), "--runners", str(runners), "--max-queue", "10000", "--log-level", "WARNING", "--http", http,
                 *a.server_args.split(), threads=per)
    else:
        n = int(mode.split("-")[1])
        prefix = f"bench{port}"
        per = max(1, a.threads // n)
        for i in range(n):
            st.spawn(py, "-m", "server.worker", "--redis-url", redis_url, *common, *dev, "--max-batch", str(a.max_batch),
                     "--threads", str(per),
                     "--prefix", prefix, "--consumer", f"b{i}", "--log-level", "WARNING", threads=per)
        st.spawn(py, "-m", "server", *common, "--max-batch", str(a.max_batch), *draft, "--redis-url", redis_url, "--prefix", prefix, "--port",
                 str(port), "--max-queue", "10000", "--log-level", "WARNING", threads=1)
    st.wait_ready(url)
    return st, url


# -- closed-loop load -----------------------------------------------------------------------
class KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client for one pre-built POST: one sendall per request, the
    response read by Content-Length. The load generator shares the 2 cores with the servers, so it
    should cost as little as a real client on another machine: this one takes ~0.1 ms of CPU per
    request, http.client ~0.3 ms. Reconnects when the server closes the connection."""

    def __init__(self, host: str, port: int, path: str, body: bytes, content_type: str, timeout: float = 60):
        self.addr, self.timeout = (host, port), timeout
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> None:
        self.close()
        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def post(self) -> tuple[int, bytes]:
        """(status, body); raises OSError/ValueError on a broken exchange (the caller reconnects)."""
        if self.sock is None:
            self._connect()
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        if "content-length" not in headers:
            raise ValueError(f"response without Content-Length: {lines[0]}")
        n = int(headers["content-length"])
        while len(self.buf) < n:
            self._recv()
        body, self.buf = self.buf[:n], self.buf[n:]
        if headers.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
            self.close()
        return status, body


def closed_loop(url: str, body: bytes, concurrency: int, warmup: float, seconds: float) -> dict:
    """Each of `concurrency` threads keeps one keep-alive connection and one request in flight."""
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    lat: list[float] = []
    batches: list[int] = []
    errors = [0]
    t_start = time.time() + warmup
    t_end = t_start + seconds

    def loop():
        client = KeepAliveClient(host, port, "/predict", body, "image/jpeg")
        while True:
            t0 = time.time()
            if t0 >= t_end:
                client.close()
                return
            try:
                status, data = client.post()
                out = json.loads(data)
                ok = status == 200
            except (OSError, ValueError):
                ok = False
                client.close()
            t1 = time.time()
            # a request counts where it finishes: with seconds-long latencies (resnet50 at c=64),
            # requiring the start inside the window as well would drop most of them
            if t_start <= t1 <= t_end:
                if ok:
                    lat.append(t1 - t0)
                    batches.append(out.get("batch_size", 1))
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(lat) * 1e3 if lat else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors[0],
            "throughput_rps": len(lat) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_batch": float(statistics.fmean(batches)) if batches else float("nan")}


def raw_model(a, body: bytes) -> dict:
    """Ceiling: predict_tensor on preprocessed crops (no HTTP, no decoding) at the best batch size,
    one call at a time with --threads threads or --threads concurrent single-thread callers; and the
    batch-1 latency, in this process."""
    from export import load_bundle
    from trainer.data.images import decode_image
    from trainer.data.transforms import eval_transform

    m = load_bundle(a.bundle, threads=a.threads, device=a.device)
    single = load_bundle(a.bundle, threads=1, device=a.device) if a.threads > 1 else m
    x1 = eval_transform(decode_image(body), m.spec)[None].numpy()

    def throughput(model, callers: int, batch: int) -> float:
        """Images/s with `callers` threads each calling predict_tensor on batches of `batch`."""
        xb = np.repeat(x1, batch, axis=0)
        for _ in range(2):
            model.predict_tensor(xb)
        counts = [0] * callers
        end = time.perf_counter() + a.seconds   # as long as a load cell: no credit for short bursts

        def loop(i):
            while time.perf_counter() < end:
                model.predict_tensor(xb)
                counts[i] += batch

        t0 = time.perf_counter()
        ts = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    # per-image cost depends on the batch size (on CPU mobilenet_v3_large is cheapest at 4-8 and
    # 20% dearer at 32): the ceiling is the best of every size, either way of using the threads
    sizes = sorted({b for b in (1, 4, 8, 16, a.max_batch) if b <= a.max_batch})
    pooled = {b: throughput(m, 1, b) for b in sizes}
    split = {b: throughput(single, a.threads, b) for b in sizes} if a.threads > 1 else pooled
    best = max([("pooled", b, v) for b, v in pooled.items()] + [("split", b, v) for b, v in split.items()],
               key=lambda t: t[2])
    return {"batched_images_per_s": best[2], "best": f"{best[0]} batch {best[1]}",
            "one_call_at_a_time": {str(b): v for b, v in pooled.items()},
            "concurrent_single_thread_calls": {str(b): v for b, v in split.items()},
            "batch1_ms": median_call_ms(lambda: m.predict_tensor(x1), calls=30),
            "decode_preprocess_ms": median_call_ms(lambda: eval_transform(decode_image(body), m.spec), calls=20)}


def median_call_ms(fn, calls: int, seconds: float = 0.0) -> float:
    """Median time of back-to-back calls of fn: at least `calls` of them, and for at least `seconds`."""
    times, end = [], time.perf_counter() + seconds
    while len(times) < calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def raw_batch1_timer(a, body: bytes):
    """-> measure(): the median batch-1 model time over a.seconds / 2 of back-to-back calls with
    --threads threads, in this process. Taken right before and right after each c=1 cell (the
    after of one cell is the before of the next), so each cell's reference is measured within
    seconds of it: this machine drifts by more than the 3 ms being judged (resnet50's batch-1
    time read 39.7 and 44.6 ms a minute apart)."""
    from export import load_bundle
    from trainer.data.images import decode_image
    from trainer.data.transforms import eval_transform

    m = load_bundle(a.bundle, threads=a.threads, device=a.device)
    x1 = eval_transform(decode_image(body), m.spec)[None].numpy()

    def measure() -> float:
        for _ in range(3):
            m.predict_tensor(x1)
        return median_call_ms(lambda: m.predict_tensor(x1), calls=10, seconds=a.seconds / 2)

    return measure


def ceiling_of(before: dict, after: dict) -> dict:
    """The best way to run the model, judged by the mean of its two measurements (before and after
    the load): the maximum of ~10 noisy single measurements would overstate the ceiling."""
    cands = {}
    for key, label in (("one_call_at_a_time", "pooled"), ("concurrent_single_thread_calls", "split")):
        for b, v in before[key].items():
            cands[f"{label} batch {b}"] = (v + after[key][b]) / 2
    config = max(cands, key=cands.get)
    return {"images_per_s": cands[config], "config": config,
            "batch1_ms": (before["batch1_ms"] + after["batch1_ms"]) / 2}


def by_concurrency(rows: list[dict], key: str) -> dict[int, float]:
    """{concurrency: median of `key` over the rounds}."""
    out: dict[int, list[float]] = {}
    for r in rows:
        out.setdefault(r["concurrency"], []).append(r[key])
    return {c: statistics.median(v) for c, v in out.items()}


def defaults_vs_tuned(modes: dict[str, list[dict]]) -> dict:
    """For each concurrency: the `defaults` server's req/s (median over the rounds) against the best
    hand-tuned embedded mode's, and their ratio (the issue's target: >= 0.95)."""
    if "defaults" not in modes:
        return {}
    tuned = {m: by_concurrency(rows, "throughput_rps") for m, rows in modes.items()
             if m.startswith("embedded")}
    out = {}
    for c, rps in by_concurrency(modes["defaults"], "throughput_rps").items():
        cands = {m: v[c] for m, v in tuned.items() if c in v}
        if cands:
            best = max(cands, key=cands.get)
            out[str(c)] = {"defaults_rps": rps, "best_rps": cands[best], "best_mode": best,
                           "ratio": rps / cands[best]}
    return out


def defaults_vs_onnxruntime(modes: dict[str, list[dict]]) -> dict:
    """For each concurrency: the `defaults` server (backend chosen at start-up) against the same server
    pinned to onnxruntime fp32 (the default before that choice): req/s ratio and p50 ratio, medians over the
    rounds (issue 21's targets on a bf16 CPU: >= 1.8x req/s at c=16, <= 0.6x p50 at c=1)."""
    if "defaults" not in modes or "defaults-onnxruntime" not in modes:
        return {}
    new, old = modes["defaults"], modes["defaults-onnxruntime"]
    rps_new, rps_old = by_concurrency(new, "throughput_rps"), by_concurrency(old, "throughput_rps")
    p50_new, p50_old = by_concurrency(new, "p50_ms"), by_concurrency(old, "p50_ms")
    return {str(c): {"defaults_rps": rps_new[c], "onnxruntime_rps": rps_old[c], "rps_ratio": rps_new[c] / rps_old[c],
                     "defaults_p50_ms": p50_new[c], "onnxruntime_p50_ms": p50_old[c],
                     "p50_ratio": p50_new[c] / p50_old[c]}
            for c in rps_new if c in rps_old}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in results["modes"].items():
        rps, p50 = by_concurrency(rows, "throughput_rps"), by_concurrency(rows, "p50_ms")
        ax[0].plot(list(rps), list(rps.values()), marker="o", label=mode)
        ax[1].plot(list(p50), list(p50.values()), marker="o", label=mode)
    if "ceiling" in results:
        ax[0].axhline(results["ceiling"]["images_per_s"], ls="--", c="gray", label="raw batched model")
    for a_, t in zip(ax, ("throughput (requests/s)", "p50 latency (ms)")):
        a_.set_xscale("log", base=2)
        a_.set_xlabel("concurrency")
        a_.set_title(t)
        a_.legend(fontsize=8)
    fig.suptitle(f"{results['model']} · {results['image']} · {results['threads']} threads (shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def model_layouts(url: str) -> list[dict]:
    """What a server says about how it runs its models (GET /models: the auto layout and why)."""
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        return [{"name": m["name"], "layout": m.get("layout")} for m in json.loads(r.read())["models"]]


def run_bundle(a, body: bytes) -> dict:
    """Every mode and concurrency (and --rounds) for the bundle a.bundle, interleaved; the raw
    model ceiling before and after (unless --no-raw)."""
    from export import read_manifest

    man = read_manifest(a.bundle)
    results = {"model": f"{man['name']} ({man.get('architecture', man['kind'])})", "image": f"{a.image_size[0]}x"
               f"{a.image_size[1]} JPEG", "threads": a.threads, "max_batch": a.max_batch, "jpeg_draft": a.jpeg_draft,
               "seconds": a.seconds, "rounds": a.rounds, "modes": {}}
    if not a.no_raw:
        results["raw"] = raw_model(a, body)
        print(f"raw model: {results['raw']['batched_images_per_s']:.1f} images/s ({results['raw']['best']}), "
              f"batch-1 {results['raw']['batch1_ms']:.2f} ms, decode+preprocess {results['raw']['decode_preprocess_ms']:.2f} ms",
              flush=True)
    redis_proc, redis_url = None, None
    if any(m.startswith("redis") for m in a.modes):
        port = free_port()
        redis_proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        redis_url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
    stacks: dict[str, tuple[Stack, str]] = {}
    batch1: list[float] = []
    try:
        for mode in a.modes:   # all up at once, so cells can interleave; each paused while not measured
            stacks[mode] = start_mode(mode, a, redis_url)
            if mode.startswith("defaults"):
                results.setdefault("defaults_layout", {})[mode] = model_layouts(stacks[mode][1])
                for m in results["defaults_layout"][mode]:
                    print(f"{mode}: {m['name']}: {json.dumps(m['layout'])}", flush=True)
            stacks[mode][0].pause()
        results["modes"] = {m: [] for m in a.modes}
        batch1_timer = raw_batch1_timer(a, body) if 1 in a.concurrency and not a.no_raw else None
        for rnd in range(a.rounds):
            for c in a.concurrency:   # interleaved: load drift on a shared machine hits every mode alike
                if batch1_timer and c == 1:
                    batch1.append(batch1_timer())
                # each round starts with the next mode: no mode always runs right after the same one
                for mode in a.modes[rnd % len(a.modes):] + a.modes[:rnd % len(a.modes)]:
                    stacks[mode][0].resume()
                    try:
                        r = closed_loop(stacks[mode][1], body, c, a.warmup, a.seconds)
                    finally:
                        stacks[mode][0].pause()
                    r["round"] = rnd
                    results["modes"][mode].append(r)
                    print(f"{mode:9s} c={c:3d}  {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f}  "
                          f"p95 {r['p95_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  batch {r['mean_batch']:5.2f}  "
                          f"errors {r['errors']}", flush=True)
                    if batch1_timer and c == 1:   # this cell's reference: the batch-1 time right before and after it
                        batch1.append(batch1_timer())
                        r["raw_batch1_ms"] = (batch1[-2] + batch1[-1]) / 2
                        print(f"          raw batch-1 model time before/after: {batch1[-2]:.2f} / {batch1[-1]:.2f} ms",
                              flush=True)
    finally:
        for st, _ in stacks.values():
            st.stop()
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait()
    if not a.no_raw:
        after = raw_model(a, body)
        results["raw_after"] = after
        results["ceiling"] = ceiling_of(results["raw"], after)
        if batch1:   # the batch-1 time measured next to the c=1 cells
            results["ceiling"]["batch1_ms"] = statistics.fmean(batch1)
        ceiling = results["ceiling"]["images_per_s"]
        print(f"raw model again: {after['batched_images_per_s']:.1f} images/s ({after['best']}); ceiling "
              f"{ceiling:.1f} ({results['ceiling']['config']}, mean of the two runs)")
        for rows in results["modes"].values():
            for r in rows:
                r["of_raw"] = r["throughput_rps"] / ceiling
                if r["concurrency"] == 1:
                    r["p50_over_raw_batch1_ms"] = r["p50_ms"] - r.get("raw_batch1_ms", results["ceiling"]["batch1_ms"])
    for key, ref in (("vs_baseline", "baseline"), ("vs_baseline_shared", "baseline-shared")):
        base = {(r["round"], r["concurrency"]): r["throughput_rps"] for r in results["modes"].get(ref, [])}
        for rows in results["modes"].values():
            for r in rows:
                if base.get((r["round"], r["concurrency"])):
                    r[key] = r["throughput_rps"] / base[(r["round"], r["concurrency"])]
    results["defaults_vs_tuned"] = defaults_vs_tuned(results["modes"])
    results["defaults_vs_onnxruntime"] = defaults_vs_onnxruntime(results["modes"])
    print("\n| mode | concurrency | req/s | p50 ms | p95 ms | p99 ms | mean batch | % of raw batched | x baseline "
          "| x baseline-shared |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, rows in results["modes"].items():
        for r in rows:
            vb, vs, raw = r.get("vs_baseline"), r.get("vs_baseline_shared"), r.get("of_raw")
            print(f"| {mode} | {r['concurrency']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {r['mean_batch']:.2f} | {'' if raw is None else f'{100 * raw:.0f}%'} | "
                  f"{'' if vb is None else f'{vb:.2f}'} | {'' if vs is None else f'{vs:.2f}'} |")
    if "ceiling" in results:
        print(f"\nceiling {results['ceiling']['images_per_s']:.1f} images/s ({results['ceiling']['config']}); raw "
              f"batch-1 model {results['ceiling']['batch1_ms']:.2f} ms; c=1 p50 above the batch-1 time measured around "
              "its cell: " + ", ".join(f"{m} {r['p50_over_raw_batch1_ms']:+.2f} ms" for m, rows in results["modes"].items()
                                      for r in rows if "p50_over_raw_batch1_ms" in r))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", dest="bundles", action="append", required=True,
                   help="bundle to serve (repeat: each bundle in turn, in one run)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="baseline: the seed's server (PIL decode, torchvision resize, one model call per "
                        "request); baseline-shared: the same with our preprocessing code; defaults: python -m "
                        "server with no tuning flags (it chooses its layout); embedded-N-bM: N runners sharing "
                        "--threads, --max-batch M (add -werkzeug for Werkzeug's HTTP server instead of granian); "
                        "redis-N: N worker processes (threads split between them). Default: baseline "
                        "baseline-shared embedded embedded-2 redis-1 redis-2")
    p.add_argument("--defaults-vs-tuned", action="store_true",
                   help="modes defaults, embedded, embedded-T, embedded-T-b8 (T: --threads) at concurrency 1 and 16 "
                        "unless --modes/--concurrency say otherwise, and no raw ceiling: prints defaults / best "
                        "tuned req/s per concurrency (the target: >= 0.95)")
    p.add_argument("--defaults-vs-onnxruntime", action="store_true",
                   help="modes defaults and defaults-onnxruntime (the same server pinned to --backend onnxruntime "
                        "--precision fp32, the default before the start-up backend choice) at concurrency 1 and 16, "
                        "no raw ceiling: prints the req/s and p50 ratios per concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default: 1 4 16 64")
    p.add_argument("--rounds", type=int, default=1, help="repeat every cell this many times (interleaved); "
                   "ratios use the median")
    p.add_argument("--no-raw", action="store_true", help="skip the raw model ceiling and the c=1 batch-1 reference")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=2, help="model threads per mode (split across workers)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--jpeg-draft", action="store_true", help="servers decode JPEGs at reduced DCT scale")
    p.add_argument("--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where our servers, workers and the raw "
                   "model run (the seed baselines stay on the CPU)")
    p.add_argument("--server-args", default="", help="extra flags for the embedded servers, e.g. '--http-threads 16'")
    p.add_argument("--serve-baseline", choices=("seed", "shared"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_baseline:
        serve_baseline(a.bundles[0], a.port, a.threads, a.serve_baseline)
        return 0
    if a.defaults_vs_tuned:
        a.modes = a.modes or ["defaults", "embedded", f"embedded-{a.threads}", f"embedded-{a.threads}-b8"]
        a.concurrency = a.concurrency or [1, 16]
        a.no_raw = True
    if a.defaults_vs_onnxruntime:
        a.modes = a.modes or ["defaults", "defaults-onnxruntime"]
        a.concurrency = a.concurrency or [1, 16]
        a.no_raw = True
    a.modes = a.modes or ["baseline", "baseline-shared", "embedded", "embedded-2", "redis-1", "redis-2"]
    a.concurrency = a.concurrency or [1, 4, 16, 64]

    from server.memory import keep_freed_memory

    keep_freed_memory()   # as in the servers: the raw ceiling gets every advantage they get
    body = make_image(*a.image_size)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally: no paused stack left behind
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for bundle in a.bundles:
        a.bundle = bundle
        results = run_bundle(a, body)
        runs.append(results)
        stem = "serve" if len(a.bundles) == 1 else f"serve-{Path(bundle).name}"
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        plot(results, out / f"{stem}.png")
        print(f"wrote {out / stem}.json and {out / stem}.png", flush=True)
    for results in runs:
        for c, v in results["defaults_vs_tuned"].items():
            print(f"defaults vs tuned: {results['model']} c={c}: {v['defaults_rps']:.1f} / {v['best_rps']:.1f} req/s "
                  f"({v['best_mode']}) = {v['ratio']:.3f}")
        for c, v in results["defaults_vs_onnxruntime"].items():
            print(f"defaults vs onnxruntime fp32: {results['model']} c={c}: {v['defaults_rps']:.1f} / "
                  f"{v['onnxruntime_rps']:.1f} req/s = {v['rps_ratio']:.2f}x; p50 {v['defaults_p50_ms']:.1f} / "
                  f"{v['onnxruntime_p50_ms']:.1f} ms = {v['p50_ratio']:.2f}x")
    print(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
