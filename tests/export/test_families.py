"""Every registry family exports, and the test itself measures each artifact against eager PyTorch:
untrained, 32 px, on the real validation images of tiny_digits, through every runtime that reads the
artifact (onnxruntime, TorchScript and, for efficientnet-pytorch, .pt2 through export.load_bundle; classify_native
and the classify binary on the same files).

    PYTHONPATH=$PWD/python:$PWD .venv/bin/python -m pytest -q tests/export/test_families.py

The exporter checks parity itself before it writes a bundle; these tests do not read that record back
as evidence: the eager reference is the checkpoint's weights in a freshly built model, normalised here.
resnet has the same in test_bundles.py, regnet and timm's test ViT in tests/native/test_modern_families.py;
tests/native/test_every_family.py runs one member of every family through the C++ runtime. .pt2 is the
slowest to build (AOTInductor, 25-60 s each on 2 cores): see CASES for which families build one here.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from export_testlib import cpp_formats, train_images, write_checkpoint

import export
from export.build import ExportOptions, build_bundle
from export.manifest import preprocess_spec, read_manifest
from trainer.data import decode_image, eval_transform
from trainer.models import create_model

pytestmark = pytest.mark.slow

TOL = 1e-4
# the loader backend that runs each artifact
BACKEND = {"torchscript": "torchscript", "onnx": "onnxruntime", "pt2": "pt2"}
# .pt2 (AOTInductor: 25-60 s of compiling each on 2 cores, most of this file's time) for the family whose
# export differs most from resnet's, which has its .pt2 (and the static batch-1 model, a second compile) in
# test_bundles.py and tests/conftest.py: efficientnet-pytorch (its own swish autograd function, swapped before
# export; "same" padding of its own Conv2d; squeeze-excite with depthwise convolutions: another library's
# modules through torch.export). The other five run TorchScript and ONNX here and TorchScript in C++; their
# operators are Inductor's stock lowerings (convolutions, grouped and depthwise; pooling; hardswish; clamp;
# concatenation), and the suite's other .pt2 graphs (resnet; timm's ViT in tests/native/test_modern_families.py)
# cover the exporter's .pt2 path itself.
CASES = [
    ("resnext50_32x4d", ["torchscript", "onnx"]),
    ("densenet121", ["torchscript", "onnx"]),
    ("mobilenet_v2", ["torchscript", "onnx"]),
    ("mobilenet_v3_small", ["torchscript", "onnx"]),
    ("efficientnet_b0", ["torchscript", "onnx"]),
    ("efficientnet-b0", ["torchscript", "onnx", "pt2"]),
]


def eager_probs(ckpt_path, images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, K) softmax of the checkpoint's model in eager PyTorch, normalised with the
    checkpoint's mean/std: the reference every artifact must match."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = create_model(ckpt["arch"], ckpt["num_classes"], ckpt["preprocess"]["crop_size"][0])
    model.load_state_dict(ckpt["model"])
    mean = torch.tensor(ckpt["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ckpt["preprocess"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model.eval()((images.float() / 255 - mean) / std), dim=1).numpy()


def assert_matches(name: str, got: np.ndarray, ref: np.ndarray) -> None:
    diff = float(np.abs(got - ref).max())
    assert diff <= TOL, f"{name}: max abs difference {diff:.3g} from eager"
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * TOL  # a near tie may break either way within the tolerance
    assert (got.argmax(1) == ref.argmax(1))[clear].all(), f"{name}: another top-1 than eager"


def cli_probs(binary, bundle, fmt: str, paths: list[str], k: int) -> np.ndarray:
    proc = subprocess.run([str(binary), "--bundle", str(bundle), "--format", fmt, "--tta", "none", "--threads", "1",
                           "--topk", str(k), *paths], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == paths and all(r["error"] is None for r in rows), rows
    probs = np.zeros((len(rows), k), np.float32)
    for i, r in enumerate(rows):
        for t in r["topk"]:
            probs[i, t["index"]] = t["prob"]
    return probs


@pytest.mark.parametrize("arch,formats", CASES, ids=[c[0] for c in CASES])
def test_family_exports_and_matches_eager(arch, formats, tmp_path, tiny_digits, native, classify_bin):
    # BatchNorm statistics from the train images: untrained mobilenets otherwise answer the same for every image
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", arch, bn_images=train_images(tiny_digits))
    out, manifest = build_bundle(ExportOptions(str(ckpt), str(tmp_path / "bundle"), formats, max_batch=8,
                                               data=str(tiny_digits), pt2_static_batches=[], tta="none"),
                                 say=lambda *_: None)
    if "pt2" in formats:
        assert manifest["artifacts"]["pt2"]["static_batch_models"] == {}
    assert read_manifest(out) == manifest and list(manifest["artifacts"]) == formats

    paths = sorted(str(p) for p in (tiny_digits / "val").rglob("*.png"))  # 24 real images, 3 classes
    spec = preprocess_spec(manifest)
    images = torch.stack([eval_transform(decode_image(p), spec) for p in paths])  # (24, 3, 32, 32) uint8
    ref = eager_probs(ckpt, images)
    assert np.ptp(ref, axis=0).max() > 1e-3  # the images give different answers: a real comparison
    for key in formats:
        bundle = export.load_bundle(out, backend=BACKEND[key], threads=1)
        # batches of 1, 2, 5 and 8 (the bundle's max_batch): a dynamic batch axis
        got = np.concatenate([bundle.predict_tensor(images[a:b]) for a, b in ((0, 1), (1, 3), (3, 8), (8, 16),
                                                                               (16, 24))])
        assert_matches(f"{BACKEND[key]} ({key})", got, ref)
    # the C++ runtime decodes and preprocesses the files itself (bit-identical to Python: tests/native)
    k = len(manifest["classes"])
    native_formats = cpp_formats(formats)
    for fmt in native_formats:
        for batch in (1, 8):
            rt = native.Runtime(str(out), format=fmt, tta="none", threads=1, batch=batch)
            results = rt.predict_files(paths, topk=k)
            assert all(r["error"] is None for r in results)
            assert_matches(f"classify_native {fmt} batch {batch}", np.stack([r["probs"] for r in results]), ref)
    cli_format = native_formats[-1]   # the .pt2 where there is one
    assert_matches(f"classify --format {cli_format}", cli_probs(classify_bin, out, cli_format, paths, k), ref)
