"""Every registry family exports and verifies, untrained, at 32 px, on real validation images.

Every family is built in every fp32 format (resnet in test_bundles.py, the rest here); .pt2 is the
slowest to build (AOTInductor, 20-60 s each on 2 cores). The loader on every backend is tested on
the resnet bundle (test_bundles.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from export_testlib import write_checkpoint

import export
from export.build import ExportOptions, build_bundle
from export.manifest import read_manifest

pytestmark = pytest.mark.slow

# The .pt2's static batch-1 model (a second compile) is built for two families whose operators differ
# most from resnet's (hardswish + squeeze-excite; swish + "same" padding); resnet has it in test_bundles.py.
CASES = [
    ("resnext50_32x4d", ["torchscript", "onnx", "pt2"], []),
    ("densenet121", ["torchscript", "onnx", "pt2"], []),
    ("mobilenet_v2", ["torchscript", "onnx", "pt2"], []),
    ("mobilenet_v3_small", ["torchscript", "onnx", "pt2"], [1]),
    ("efficientnet_b0", ["torchscript", "onnx", "pt2"], []),
    ("efficientnet-b0", ["torchscript", "onnx", "pt2"], [1]),
]


@pytest.mark.parametrize("arch,formats,static", CASES, ids=[c[0] for c in CASES])
def test_family_exports_and_verifies(arch, formats, static, tmp_path, tiny_digits):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", arch)
    out, manifest = build_bundle(ExportOptions(str(ckpt), str(tmp_path / "bundle"), formats, max_batch=8,
                                               data=str(tiny_digits), pt2_static_batches=static), say=lambda *_: None)
    assert manifest["artifacts"]["pt2"]["static_batch_models"] == {str(n): f"batch{n}" for n in static}
    assert read_manifest(out) == manifest and list(manifest["artifacts"]) == formats
    for key in formats:
        parity = manifest["artifacts"][key]["parity"]
        assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agree"] and parity["batch_sizes"] == [1, 2, 5]
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    probs = export.load_bundle(out, backend="onnxruntime").predict_tensor(x)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)  # probabilities, not logits
