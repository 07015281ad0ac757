"""Server test helpers: a real redis-server on a free loopback port, a fake model, a small real
bundle, and a live HTTP server in a thread (traffic only ever goes to 127.0.0.1).

Not a conftest.py on purpose: a second conftest module would replace the root one in sys.modules
and break the `from conftest import ...` of other test folders. Test modules import the fixtures
they use from here; the expensive resources are built once per session (module-level caches).
"""
from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import atexit
import os
import tempfile

from conftest import FAST_TRAIN, REPO, run_cli

REDIS_BIN = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """redis-server without persistence, bound to 127.0.0.1; stop()/start() keep the port."""

    def __init__(self, workdir: Path):
        self.port, self.workdir, self.proc = free_port(), workdir, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def client(self):
        import redis
        return redis.Redis.from_url(self.url)


_CACHE: dict = {}


def _tmpdir(name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"server-{name}-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@pytest.fixture(scope="session")
def redis_proc():
    if REDIS_BIN is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh` (apt package redis-server)")
    if "redis" not in _CACHE:
        rp = RedisProcess(_tmpdir("redis"))
        rp.start()
        atexit.register(rp.stop)
        _CACHE["redis"] = rp
    return _CACHE["redis"]


@pytest.fixture
def redis_url(redis_proc):
    if redis_proc.proc.poll() is not None:
        redis_proc.start()
    redis_proc.client().flushall()
    return redis_proc.url


# -- a fake model: fast, deterministic, depends on every pixel ---------------------------------
def make_fake_model(name: str = "fake", n_classes: int = 3, size: int = 32, delay_s: float = 0.0, calls=None):
    from trainer.data.transforms import PreprocessSpec
    from trainer.tta import parse_policy

    from server.models import ServedModel

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * size * size, n_classes)).astype(np.float32) / (255.0 * 8)

    def predict(x: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(x.shape[0])
        if delay_s:
            time.sleep(delay_s)
        z = x.reshape(x.shape[0], -1).astype(np.float32) @ w
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    spec = PreprocessSpec.for_size(size, crop_pct=1.0)
    return ServedModel(name=name, version="test", kind="model", classes=[f"c{i}" for i in range(n_classes)],
                       spec=spec, tta_default="none", tta_views=parse_policy("none"), tta_merge="mean", max_batch=64,
                       manifest={}, path="<fake>", predict=predict)


def png_bytes(size=(40, 36), seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


class LiveServer:
    """A Flask app served by Werkzeug in a background thread on a free loopback port."""

    def __init__(self, app):
        from werkzeug.serving import make_server
        self.srv = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.srv.server_port}"
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.srv.shutdown()
        self.thread.join(5)


# -- a small real bundle (resnet18, 32 px, 1 epoch on tiny digits, ONNX) -------------------------
@pytest.fixture(scope="session")
def digits_bundle(tiny_digits) -> Path:
    if "bundle" not in _CACHE:
        _CACHE["bundle"] = _build_bundle(tiny_digits)
    return _CACHE["bundle"]


def _build_bundle(tiny_digits) -> Path:
    out = _tmpdir("bundle")
    run = out / "run"
    r = run_cli("train", "--data", str(tiny_digits), "--epochs", "1", "--out", str(run), *FAST_TRAIN,
                env_extra={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "best.pt"
    bundle = out / "digits"
    r = run_cli("--checkpoint", str(ckpt), "--out", str(bundle), "--format", "onnx", "--name", "digits",
                module="export", env_extra={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return bundle


def start_worker(redis_url: str, bundle: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "server.worker", "--redis-url", redis_url, "--bundle", str(bundle),
                             "--threads", "1", "--log-level", "WARNING", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()   # drain
            return
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
    raise RuntimeError("worker did not become ready")


@pytest.fixture(scope="session")
def ensemble_bundle(digits_bundle) -> Path:
    """An ensemble (vote fusion) of the digits bundle with itself under two names."""
    if "ensemble" not in _CACHE:
        out = _tmpdir("ensemble")
        twin = out / "twin"
        shutil.copytree(digits_bundle, twin)
        r = run_cli("ensemble", "--members", str(digits_bundle), str(twin), "--weights", "2", "1", "--fusion", "vote",
                    "--out", str(out / "ens"), "--name", "digits-ens", module="export")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        _CACHE["ensemble"] = out / "ens"
    return _CACHE["ensemble"]


def digit_images(tiny_digits: Path, n: int) -> list[Path]:
    files = sorted((tiny_digits / "val").glob("*/*.png"))
    return [files[i * len(files) // n] for i in range(n)]


# -- Redis keys of one bundle (they are named by its checksum) ---------------------------------
def keys_of(model, name: str | None = None, prefix: str = "srv"):
    """The Redis keys of one bundle: ``model`` a ServedModel or a bundle directory (then ``name`` is
    the model name, default the manifest's). keys_of(m).jobs -> 'srv:jobs:fake:<16 hex>'."""
    from types import SimpleNamespace

    from server.redisq import Keys, bundle_checksum, manifest_checksum

    if isinstance(model, (str, Path)):
        import json
        checksum = manifest_checksum(model)
        name = name or json.loads((Path(model) / "manifest.json").read_text())["name"]
    else:
        checksum, name = bundle_checksum(model), name or model.name
    k = Keys(prefix)
    return SimpleNamespace(checksum=checksum, jobs=k.jobs(name, checksum), dead=k.dead(name, checksum),
                           workers=k.workers(name, checksum), execution=k.execution(name, checksum),
                           rows=k.rows(name, checksum), stats=k.stats(name, checksum), bundles=k.bundles(name))


def start_held_worker(redis_url: str, bundle: Path, hold_dir: Path, nth_call: int, *extra: str) -> subprocess.Popen:
    """start_worker whose nth model call creates hold_dir/entered, then waits for hold_dir/release
    (tests/server/held_worker.py): the test decides when the worker is inside a batch."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("held_worker.py")
    return subprocess.Popen([sys.executable, str(script), str(hold_dir), str(nth_call), "--", "--redis-url", redis_url,
                             "--bundle", str(bundle), "--threads", "1", "--log-level", "WARNING", *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_state(cond, timeout: float = 60.0) -> bool:
    """Poll a state the test forced (a file, a key); the timeout only bounds a failing run."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(cond())
