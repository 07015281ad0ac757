"""Every registered model family runs in the C++ runtime: the classify binary and classify_native give
the Python loader's probabilities (within 1e-4) on real and odd images.

    PYTHONPATH=$PWD/python:$PWD .venv/bin/python -m pytest -q tests/native/test_every_family.py

One member per family, untrained, 32 px, 3 classes. The families another test already exports and runs
through both C++ readers are listed in ELSEWHERE (and checked to still be there); the rest are exported
here to TorchScript (seconds each; .pt2 and ONNX of every family would take minutes). Members of one
family share their operators, so one member stands for the family.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from export import load_bundle
from trainer.models import list_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from export_testlib import train_images, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
TOL = 1e-4
# family -> (member, test file that exports it and runs it through classify and classify_native)
ELSEWHERE = {
    "resnet": ("resnet18", "conformance/test_conformance.py"),  # bundle_a of tests/conftest.py
    "resnext": ("resnext50_32x4d", "export/test_families.py"),
    "densenet": ("densenet121", "export/test_families.py"),
    "mobilenet_v2": ("mobilenet_v2", "export/test_families.py"),
    "mobilenet_v3": ("mobilenet_v3_small", "export/test_families.py"),
    "efficientnet": ("efficientnet_b0", "export/test_families.py"),
    "efficientnet-pytorch": ("efficientnet-b0", "export/test_families.py"),
    "regnet": ("regnet_y_400mf", "native/test_modern_families.py"),
    "timm": ("timm/test_vit", "native/test_modern_families.py"),
}
# family -> member exported here (TorchScript)
HERE = {"efficientnet_v2": "efficientnet_v2_s", "convnext": "convnext_tiny", "swin": "swin_t", "vit": "vit_b_16"}


def test_every_registered_family_is_covered():
    """A family added to the registry fails here until a test runs it through the C++ runtime."""
    families = {s.family for s in list_models()} | {"timm"}  # timm/<name>: open-ended, one family
    assert families == set(ELSEWHERE) | set(HERE) and not set(ELSEWHERE) & set(HERE)
    by_family = {s.name: s.family for s in list_models()}
    for family, member in HERE.items():
        assert by_family[member] == family
    for family, (member, test_file) in ELSEWHERE.items():
        assert member.startswith("timm/") or by_family[member] == family
        text = (TESTS / test_file).read_text()
        named_in = TESTS / "conftest.py" if family == "resnet" else TESTS / test_file  # bundle_a: conftest._train
        assert f'"{member}"' in named_in.read_text(), f"{named_in} no longer exports {member}"
        assert "classify_bin" in text and "native" in text, f"{test_file} no longer runs both C++ readers"


@pytest.fixture(scope="module", params=sorted(HERE.values()))
def family_bundle(request, tiny_digits, tmp_path_factory) -> Iterator[Path]:
    from export.build import ExportOptions, build_bundle

    root = tmp_path_factory.mktemp(request.param)
    # BatchNorm statistics from real images: untrained efficientnet_v2_s otherwise gives one answer for all
    ckpt = write_checkpoint(root / "ckpt.pt", request.param, bn_images=train_images(tiny_digits))
    out, manifest = build_bundle(ExportOptions(str(ckpt), str(root / "bundle"), ["torchscript"], max_batch=4,
                                               data=str(tiny_digits)), say=lambda *a, **k: None)
    assert manifest["architecture"] == request.param
    yield out
    shutil.rmtree(root, ignore_errors=True)  # up to 0.7 GB a family (vit_b_16): keep the suite's peak disk low


def test_family_runs_in_the_cpp_runtime(family_bundle, native, classify_bin, eval_images):
    ref = load_bundle(family_bundle, backend="torchscript", threads=1).predict(eval_images)
    assert np.ptp(ref.probs, axis=0).max() > 1e-4  # the images give different answers: a real comparison
    rt = native.Runtime(str(family_bundle), format="torchscript", threads=1, batch=4)
    results = rt.predict_files(eval_images)
    assert [r["error"] for r in results] == [None] * len(eval_images)
    assert np.abs(np.stack([r["probs"] for r in results]) - ref.probs).max() <= TOL
    k = len(ref.classes)
    proc = subprocess.run([str(classify_bin), "--bundle", str(family_bundle), "--format", "torchscript",
                           "--threads", "1", "--topk", str(k), *eval_images], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == eval_images and all(r["error"] is None for r in rows)
    got = np.zeros_like(ref.probs)
    for i, r in enumerate(rows):
        for t in r["topk"]:
            got[i, t["index"]] = t["prob"]
    assert np.abs(got - ref.probs).max() <= TOL
