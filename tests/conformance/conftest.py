"""Fixtures of the conformance suite: the case set (written once per session) and the three readers."""
from __future__ import annotations

from pathlib import Path

import pytest

from .bundle_cases import write_bundle_cases
from .image_cases import BAD_IMAGE_CASES, IMAGE_CASES



@pytest.fixture(scope="session")
def bundle_cases(bundle_a, bundle_b, keys, tmp_path_factory):
    return write_bundle_cases(bundle_a, bundle_b, tmp_path_factory.mktemp("conformance_bundles"), keys)


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
