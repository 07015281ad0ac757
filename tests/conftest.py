"""Shared fixtures: the digits demo written once per session, small subsets of it, image factories."""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "2")
NATIVE_BUILD_HINT = ("build it with 'bash scripts/setup.sh' (editable install: build/bin/classify, "
                     "python/classify_native/_core*.so) or install the package: pip install --no-build-isolation .")


def classify_binary() -> Path | None:
    """The classify binary every test runs (None when there is none): $CLASSIFY_BIN, else this checkout's
    build (build/bin/classify, which is what an editable install's bin/classify launches, so the tests run
    the checkout's C++), else the one a wheel installed into this Python's scripts folder."""
    if os.environ.get("CLASSIFY_BIN"):
        return Path(os.environ["CLASSIFY_BIN"])
    for path in (REPO / "build" / "bin" / "classify", Path(sysconfig.get_path("scripts")) / "classify"):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None

@pytest.fixture(scope="session")
def native():
    """The classify_native module (skips, saying how to build it, where it is not built)."""
    try:
        import classify_native
    except ImportError as exc:
        pytest.skip(f"native module not built ({exc}); {NATIVE_BUILD_HINT}")
    return classify_native


@pytest.fixture(scope="session")
def classify_bin() -> Path:
    path = classify_binary()
    if path is None:
        pytest.skip(f"no classify binary; {NATIVE_BUILD_HINT}")
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Ed25519 key files from 'python -m export keygen': (private, its public, another pair's public)."""
    from export.signing import generate_keypair

    root = tmp_path_factory.mktemp("signing_keys")
    priv, pub = generate_keypair(root / "ours")
    return priv, pub, generate_keypair(root / "theirs")[1]


def signed_copy(bundle: Path, private_key: Path, dst: Path) -> Path:
    """A copy of ``bundle`` at ``dst``, signed with ``private_key``."""
    from export.signing import sign_bundle

    shutil.copytree(bundle, dst)
    sign_bundle(dst, private_key)
    return dst


# Precision of every fixture's training run: "auto" (bf16 where the CPU has it) by default;
# TRAINER_TEST_AMP=none forces fp32 everywhere, which is what a CPU without bf16 (AVX2 only) runs.
# docs/trainer.md shows how to run the suite as such a machine would.
TEST_AMP = os.environ.get("TRAINER_TEST_AMP", "auto")


@pytest.fixture(scope="session", autouse=True)
def _private_index_cache(tmp_path_factory):
    """The trainer's persistent image index goes to a temporary folder, never the user's ~/.cache."""
    os.environ["SHIPCLASSIFIER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """load_bundle(threads=N) and the trainer's --threads set torch's process-wide thread count; a test
    that leaves it changed makes later in-process runs sum in another order than the subprocesses they
    are compared with (an exact-resume test failed on a last-digit loss difference)."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from trainer.data.demo import write_digits_dataset

    root = tmp_path_factory.mktemp("digits")
    write_digits_dataset(root)
    return root


def _subset(src: Path, dst: Path, classes: list[str], n_train: int, n_val: int) -> Path:
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / c).glob("*.png"))[:n]:
                shutil.copy(f, dst / split / c / f.name)
    return dst


@pytest.fixture(scope="session")
def tiny_digits(digits_root, tmp_path_factory) -> Path:
    """3 classes, 24 train + 8 val images each: enough to train for a few steps in a second."""
    return _subset(digits_root, tmp_path_factory.mktemp("tiny"), ["0", "1", "7"], 24, 8)


@pytest.fixture
def tiny_copy(tiny_digits, tmp_path) -> Path:
    """A private, writable copy of tiny_digits (for tests that damage it)."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_digits, dst)
    return dst


def write_image(path: Path, mode: str = "RGB", size=(20, 16), fmt: str | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert("P")
    else:
        base = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        img = base.convert(mode)
    img.save(path, format=fmt)
    return path


def run_cli(*args: str, cwd: Path | None = None, env_extra: dict | None = None, timeout: int = 600,
            module: str = "trainer") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


FAST_TRAIN = ["--model", "resnet18", "--img-size", "32", "--crop-pct", "1.0", "--batch-size", "16",
              "--workers", "0", "--hflip", "0", "--scale-min", "0.8", "--lr", "0.05", "--warmup-epochs", "0.5",
              "--amp", TEST_AMP, "--quiet"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        # the marker, not item.keywords: keywords also hold folder names, so a checkout in a folder named
        # "gpu" would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# ---- tiny real bundles made by the export package (tests/native and tests/conformance) ----------
def _train(data: Path, out: Path, seed: int, **kw) -> Path:
    from trainer.config import TrainConfig
    from trainer.engine.train import train

    cfg = dict(data=str(data), out=str(out), model="resnet18", img_size=32, crop_pct=0.875, batch_size=16,
               workers=0, hflip=0.0, scale_min=0.8, lr=0.05, warmup_epochs=0.5, epochs=1, quiet=True, seed=seed)
    cfg.update(kw)
    train(TrainConfig(**cfg))
    return out / "best.pt"


def _export(ckpt: Path, out: Path, formats: list[str], **kw) -> Path:
    from export.build import ExportOptions, build_bundle

    build_bundle(ExportOptions(checkpoint=str(ckpt), out=str(out), formats=formats, max_batch=8, **kw),
                 say=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def bundle_a(tiny_digits, tmp_path_factory) -> Path:
    """resnet18, 32x32 crop after resize 36 (bilinear), TorchScript + .pt2, default TTA hflip."""
    root = tmp_path_factory.mktemp("native_a")
    return _export(_train(tiny_digits, root / "run", seed=0), root / "bundle", ["torchscript", "pt2"], tta="hflip")


@pytest.fixture(scope="session")
def bundle_b(tiny_digits, tmp_path_factory) -> Path:
    """A second member with other preprocessing: crop 28 after resize 32, bicubic; TorchScript only."""
    root = tmp_path_factory.mktemp("native_b")
    ckpt = _train(tiny_digits, root / "run", seed=1, img_size=28, interpolation="bicubic")
    return _export(ckpt, root / "bundle", ["torchscript"])


@pytest.fixture(scope="session")
def ensembles(bundle_a, bundle_b, tmp_path_factory) -> dict[str, Path]:
    from export.ensemble import build_ensemble

    root = tmp_path_factory.mktemp("native_ens")
    out = {}
    for fusion, weights in (("weighted", [3.0, 1.0]), ("vote", [1.0, 2.0]), ("mean", None)):
        path, _ = build_ensemble([str(bundle_a), str(bundle_b)], str(root / fusion), weights, fusion,
                                 tta="hflip" if fusion == "weighted" else "none", say=lambda *a, **k: None)
        out[fusion] = Path(path)
    return out


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """A 256 KiB signal stack with a guard page for the main thread (export.sigstack), in place of the
    16-18 KB one faulthandler (enabled by pytest) allocated: room for a signal frame with AMX tile state,
    a handler and faulthandler's traceback. After pytest's own faulthandler setup: CPython allocates that
    stack once and never reinstalls it. export.openvino_backend.shared_core restores it after OpenVINO's
    CPU plugin loads (the plugin swaps in its own); tests/export/test_sigstack.py checks the stack after that."""
    from export.sigstack import ensure_signal_stack

    ensure_signal_stack()


@pytest.fixture(autouse=True)
def _sigchld_restored():
    """Put SIGCHLD back as each test found it. A DataLoader with workers leaves torch's SIGCHLD handler in
    this process for good; with it installed, after OpenVINO had run bf16 (AMX) here, the kernel answered the
    exit of the next child process with SIGSEGV (si_code SI_KERNEL, in waitpid) and the whole run died (CI,
    tests/export/test_openvino.py after tests/batch). Reproduced with those two files only; resetting SIGCHLD
    between tests made the same pair pass. (The handler ran on the signal stack OpenVINO had left, too
    small or unmapped: export.sigstack mends that; this keeps the trigger out as well.)"""
    before = signal.getsignal(signal.SIGCHLD)
    yield
    if signal.getsignal(signal.SIGCHLD) is not before:
        signal.signal(signal.SIGCHLD, before)


# ---- disk: the run writes about 14 GB of bundles; say how close it came to a full disk -----------------
class _DiskWatch:
    """Free space on the file system of pytest's base temp dir after every test (one statvfs call), the
    lowest seen and the test that left it so. A run on a nearly full disk otherwise ends in a wall of
    unrelated-looking errors (tmp_path, torch.save, pytest's own capture file) that name no cause."""

    LOW = 2 << 30  # below this, name the disk as the likely cause

    def __init__(self, config):
        self.config = config
        self.lowest: tuple[int, str] | None = None

    def _free(self) -> int | None:
        factory = getattr(self.config, "_tmp_path_factory", None)
        base = getattr(factory, "_basetemp", None)
        try:
            return shutil.disk_usage(base or os.environ.get("TMPDIR", "/tmp")).free
        except OSError:
            return None

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid, location):
        free = self._free()
        if free is not None and (self.lowest is None or free < self.lowest[0]):
            self.lowest = (free, nodeid)

    def pytest_terminal_summary(self, terminalreporter):
        if self.lowest is None:
            return
        free, nodeid = self.lowest
        line = f"disk: lowest free space in the temp dir's file system during the run: {free / 2**30:.1f} GiB, after {nodeid}"
        if free < self.LOW:
            terminalreporter.write_line(line + " -- LOW: errors from then on may be 'No space left on device'; "
                                        "free space or point TMPDIR at a bigger disk", red=True, bold=True)
        else:
            terminalreporter.write_line(line)


def pytest_sessionstart(session):
    session.config.pluginmanager.register(_DiskWatch(session.config), "shipclassifier-diskwatch")
