"""Modern families end to end: export to TorchScript, ONNX and .pt2 through the parity gate, then
served by the C++ runtime (classify binary and classify_native) with the Python loader's results.

    pytest -q tests/native/test_modern_families.py

Two small representatives keep CI time down: torchvision's RegNetY-400MF (grouped convolutions +
squeeze-excite; TorchScript and ONNX) and timm's tiny test ViT (attention, layer norm, GELU, position
embeddings; also a .pt2, the one AOTInductor compile of this file: 25-45 s on 2 cores, and the only
attention graph compiled in the suite). Every family's construction, head and features are covered in
tests/trainer/test_models.py; the heavy exports (ViT-B/16, Swin-T, ConvNeXt) are run by hand
(docs/export.md lists the figures).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from export_testlib import cpp_formats, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 1e-4
# the formats each builds; the C++ runtime reads TorchScript and .pt2
ARCHS = {"regnet_y_400mf": ["torchscript", "onnx"], "timm/test_vit": ["torchscript", "onnx", "pt2"]}


@pytest.fixture(scope="module", params=list(ARCHS))
def family_bundle(request, tmp_path_factory) -> Iterator[tuple[str, Path, dict]]:
    from export.build import ExportOptions, build_bundle

    arch = request.param
    if arch.startswith("timm/"):
        pytest.importorskip("timm")
    root = tmp_path_factory.mktemp(arch.replace("/", "_"))
    ckpt = write_checkpoint(root / "ckpt.pt", arch)
    out, manifest = build_bundle(ExportOptions(str(ckpt), str(root / "bundle"), ARCHS[arch], max_batch=8,
                                               pt2_static_batches=[]), say=lambda *a, **k: None)
    yield arch, out, manifest
    shutil.rmtree(root, ignore_errors=True)  # keep the suite's peak disk low


def test_exports_pass_the_parity_gate(family_bundle):
    arch, _, manifest = family_bundle
    assert manifest["architecture"] == arch and list(manifest["artifacts"]) == ARCHS[arch]
    assert "/" not in manifest["name"]  # "timm/..." would otherwise leak a path separator into the name
    for art in manifest["artifacts"].values():
        assert art["parity"]["max_abs_diff"] <= 1e-4 and art["parity"]["top1_agree"]


def test_classify_binary_matches_python(classify_bin, family_bundle, eval_images):
    _, bundle, manifest = family_bundle
    ref = load_bundle(bundle, backend="onnxruntime", threads=1).predict(eval_images, topk=3)
    for fmt in cpp_formats(manifest["artifacts"]):
        res = subprocess.run([str(classify_bin), "--bundle", str(bundle), "--format", fmt, "--topk", "3",
                              "--threads", "1", *eval_images], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        out = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
        assert [o["path"] for o in out] == eval_images
        for o, probs in zip(out, ref.probs):
            for t in o["topk"]:
                assert abs(t["prob"] - probs[t["index"]]) <= TOL, (fmt, o["path"])


def test_native_module_matches_python(native, family_bundle, eval_images):
    _, bundle, manifest = family_bundle
    ref = load_bundle(bundle, backend="onnxruntime", threads=1).predict(eval_images)
    for fmt in cpp_formats(manifest["artifacts"]):
        rt = native.Runtime(str(bundle), format=fmt, threads=1, batch=4)
        got = np.stack([r["probs"] for r in rt.predict_files(eval_images)])
        assert np.abs(got - ref.probs).max() <= TOL, fmt
