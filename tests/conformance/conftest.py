"""Fixtures of the conformance suite: the case set (written once per session) and the three readers."""
from __future__ import annotations

from pathlib import Path

import pytest

from .bundle_cases import write_bundle_cases
from .image_cases import BAD_IMAGE_CASES, IMAGE_CASES

REPO = Path(__file__).resolve().parents[2]
CLASSIFY_BIN = REPO / "build" / "bin" / "classify"
BUILD_HINT = "build it with 'bash scripts/setup.sh' or 'cmake -S . -B build && cmake --build build -j2'"


@pytest.fixture(scope="session")
def bundle_cases(bundle_a, bundle_b, tmp_path_factory):
    return write_bundle_cases(bundle_a, bundle_b, tmp_path_factory.mktemp("conformance_bundles"))


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> tuple[list[Path], dict[Path, str]]:
    """(good image files, {bad image file: category})."""
    root = tmp_path_factory.mktemp("conformance_images")
    good = []
    for name, writer in IMAGE_CASES:
        writer(root / name)
        good.append(root / name)
    bad = {}
    for name, writer, category in BAD_IMAGE_CASES:
        writer(root / name)
        bad[root / name] = category
    return good, bad


@pytest.fixture(scope="session")
def native_module():
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
