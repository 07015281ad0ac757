"""Fixtures for the native runtime tests: the compiled module, the classify binary, test images.

The native build is made by scripts/setup.sh (an editable install that builds into build/) or comes from an
installed wheel; conftest.classify_binary() says which binary runs. Without a build these tests skip and say
how to build it; CI runs setup.sh first, so there they run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import NATIVE_BUILD_HINT as BUILD_HINT, classify_binary
from .native_samples import sample_images


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: the C++ side and the Python reference share torch's (global) pool, and on a
    busy 2-core machine two spinning OpenMP threads per process run several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def native():
    try:
        import classify_native
    except ImportError as exc:
        pytest.skip(f"native module not built ({exc}); {BUILD_HINT}")
    return classify_native


@pytest.fixture(scope="session")
def classify_bin() -> Path:
    path = classify_binary()
    if path is None:
        pytest.skip(f"no classify binary; {BUILD_HINT}")
    return path


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("native_images")
    for name, data in sample_images().items():
        (root / name).write_bytes(data)
    return root


# ---- bundles made by the export package (the contract is proven from both sides) -------------
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


@pytest.fixture(scope="session")
def eval_images(tiny_digits, image_dir) -> list[str]:
    """Digits validation PNGs plus the decode cases (JPEG, gray, RGBA, 16-bit, EXIF, odd sizes)."""
    digits = sorted(str(p) for p in (tiny_digits / "val").rglob("*.png"))[:9]
    extra = [str(image_dir / n) for n in ("rgb420.jpg", "gray.jpg", "rgba.png", "gray16.png", "exif6.jpg",
                                          "palette.png", "odd_progressive.jpg", "tiny_1x1.png")]
    return digits + extra
