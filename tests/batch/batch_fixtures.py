"""Fixtures for python -m batch: a tiny bundle, an ensemble, a folder of images with an unreadable one.

Not a conftest.py, and tests/batch is no package, for two reasons: a second conftest module would
replace the root one in sys.modules (see tests/server/server_fixtures.py), and a package named
"batch" would shadow the batch package under test. Test modules import the fixtures they use."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hflip_bundle(bundle_a) -> Path:
    """resnet18 32 px, the bundle's default TTA hflip (two views per image); the tests use its TorchScript.
    tests/conftest.py's bundle_a, which the native and conformance tests build anyway in a full run."""
    return bundle_a


@pytest.fixture(scope="session")
def ensemble_bundle(ensembles) -> Path:
    """bundle_a + bundle_b (32 px bilinear, 28 px bicubic preprocessing), weighted 3:1, TTA hflip."""
    return ensembles["weighted"]


@pytest.fixture(scope="session")
def image_tree(tiny_digits, tmp_path_factory) -> Path:
    """The 24 validation digits in class folders, one of them re-encoded as JPEG, and a file named .png
    that is not an image: 25 inputs, one error row."""
    from PIL import Image

    root = tmp_path_factory.mktemp("batch_images") / "images"
    shutil.copytree(tiny_digits / "val", root)
    first = sorted(root.rglob("*.png"))[0]
    Image.open(first).convert("RGB").save(first.with_suffix(".jpg"), quality=90)
    first.unlink()
    (root / "7" / "broken.png").write_bytes(b"this is not a png")
    return root


def manifest_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
