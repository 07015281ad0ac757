"""Fixtures for the native runtime tests: the compiled module, the classify binary, test images.

The native build is made by scripts/setup.sh (or: cmake -S . -B build && cmake --build build -j2).
Without it these tests skip and say how to build it; CI runs setup.sh first, so there they run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from native_samples import sample_images

REPO = Path(__file__).resolve().parents[2]
CLASSIFY_BIN = Path(os.environ.get("CLASSIFY_BIN", REPO / "build" / "bin" / "classify"))
BUILD_HINT = "build it with 'bash scripts/setup.sh' or 'cmake -S . -B build && cmake --build build -j2'"


@pytest.fixture(scope="session")
def native():
    try:
        import classify_native
    except ImportError as exc:
        pytest.skip(f"native module not built ({exc}); {BUILD_HINT}")
    return classify_native


@pytest.fixture(scope="session")
def classify_bin() -> Path:
    if not CLASSIFY_BIN.is_file():
        pytest.skip(f"native binary {CLASSIFY_BIN} not built; {BUILD_HINT}")
    return CLASSIFY_BIN


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("native_images")
    for name, data in sample_images().items():
        (root / name).write_bytes(data)
    return root
