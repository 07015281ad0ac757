"""Fixtures for python -m batch: tiny TorchScript bundles (fast to export), an ensemble, a folder of
images with an unreadable one among them.

Not a conftest.py, and tests/batch is no package, for two reasons: a second conftest module would
replace the root one in sys.modules (see tests/server/server_fixtures.py), and a package named
"batch" would shadow the batch package under test. Test modules import the fixtures they use."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import _export, _train


@pytest.fixture(scope="session")
def hflip_bundle(tiny_digits, tmp_path_factory) -> Path:
    """resnet18 32 px, TorchScript only, the bundle's default TTA hflip (two views per image)."""
    root = tmp_path_factory.mktemp("batch_bundle")
    return _export(_train(tiny_digits, root / "run", seed=0), root / "bundle", ["torchscript"], tta="hflip")


@pytest.fixture(scope="session")
def ensemble_bundle(hflip_bundle, bundle_b, tmp_path_factory) -> Path:
    """Two members with different preprocessing (32 px bilinear, 28 px bicubic), weighted 3:1."""
    from export.ensemble import build_ensemble

    path, _ = build_ensemble([str(hflip_bundle), str(bundle_b)], str(tmp_path_factory.mktemp("batch_ens") / "ens"),
                             [3.0, 1.0], "weighted", tta="hflip", say=lambda *a, **k: None)
    return Path(path)


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
