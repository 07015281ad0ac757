"""Fixtures for the native runtime tests: the compiled module, the classify binary, test images.

The native build is made by scripts/setup.sh (an editable install that builds into build/) or comes from an
installed wheel; conftest.classify_binary() says which binary runs. Without a build these tests skip and say
how to build it; CI runs setup.sh first, so there they run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
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
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("native_images")
    for name, data in sample_images().items():
        (root / name).write_bytes(data)
    return root


# bundle_a, bundle_b and ensembles (the tiny real bundles) live in tests/conftest.py: tests/conformance
# runs the same ones. Their helpers stay importable from here (test_devices.py).
from conftest import _export, _train  # noqa: E402,F401


@pytest.fixture(scope="session")
def eval_images(tiny_digits, image_dir) -> list[str]:
    """Digits validation PNGs plus the decode cases (JPEG, gray, RGBA, 16-bit, EXIF, odd sizes)."""
    digits = sorted(str(p) for p in (tiny_digits / "val").rglob("*.png"))[:9]
    extra = [str(image_dir / n) for n in ("rgb420.jpg", "gray.jpg", "rgba.png", "gray16.png", "exif6.jpg",
                                          "palette.png", "odd_progressive.jpg", "tiny_1x1.png")]
    return digits + extra
