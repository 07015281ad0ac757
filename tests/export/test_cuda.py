"""CUDA bundles end to end: export --device cuda, every CUDA backend against the CPU, fp16/bf16 variants.
Skipped without a GPU; run on one with ``pytest -m gpu`` (scripts/gpu_check.sh does).

    pytest -q -m gpu tests/export/test_cuda.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, run_cli

import export
from export.manifest import file_sha256, read_manifest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def cuda_bundle(tiny_digits, tmp_path_factory) -> Path:
    """A trained digits model (real images: the fp16/bf16 top-1 check means something), exported with
    every format on the CPU and TorchScript + .pt2 for CUDA in fp32, fp16 and bf16 (only dynamic-batch .pt2
    models, to keep the compile time down; scripts/gpu_check.sh exports one with the static batch-1 model)."""
    root = tmp_path_factory.mktemp("cuda")
    res = run_cli("train", "--data", str(tiny_digits), "--out", str(root / "run"), "--epochs", "3", "--device", "cuda",
                  *FAST_TRAIN)
    assert res.returncode == 0, res.stderr
    res = run_cli("--checkpoint", str(root / "run" / "best.pt"), "--format", "all", "--out", str(root / "bundle"),
                  "--data", str(tiny_digits), "--max-batch", "16", "--device", "cuda", "--precision", "fp32", "fp16",
                  "bf16", "--pt2-static-batches", module="export")
    assert res.returncode == 0, res.stdout + res.stderr
    return root / "bundle"


@pytest.fixture(scope="module")
def val_paths(tiny_digits) -> list[str]:
    return sorted(str(p) for p in (tiny_digits / "val").rglob("*.png"))


def test_manifest_records_each_cuda_artifact_with_its_device(cuda_bundle):
    m = read_manifest(cuda_bundle)
    for key in ("torchscript", "pt2"):
        assert m["artifacts"][key]["device"] == "cpu"
        for prec in ("fp32", "fp16", "bf16"):
            name = f"{key}_cuda" + ("" if prec == "fp32" else f"_{prec}")
            art = m["artifacts"][name]
            assert (art["device"], art["precision"]) == ("cuda", prec)
            assert art["sha256"] == file_sha256(cuda_bundle / art["file"])
            assert art["compiled_for"]["capability"] == "{}.{}".format(*torch.cuda.get_device_capability(0))
            assert art["parity"]["max_abs_diff"] <= art["parity"]["tolerance"]
            if prec != "fp32":
                q = art["quality"]
                assert q["images"] == 24 and q[f"top1_{prec}"] >= q["top1_fp32"] - 0.01
    assert m["artifacts"]["pt2_cuda"]["static_batch_models"] == {}
    onnx = m["artifacts"]["onnx"]
    assert onnx["parity_cuda"]["provider"] == "CUDAExecutionProvider" and onnx["parity_cuda"]["top1_agree"]


@pytest.mark.parametrize("backend, tol", [("auto", 1e-3), ("pt2", 1e-3), ("torchscript", 1e-3), ("onnxruntime", 1e-3),
                                          ("pt2-fp16", 2e-2), ("torchscript-bf16", 6e-2), ("eager", 1e-3)])
def test_every_cuda_backend_matches_the_cpu_on_real_images(cuda_bundle, val_paths, backend, tol):
    cpu = export.load_bundle(cuda_bundle, backend="pt2").predict(val_paths)
    gpu = export.load_bundle(cuda_bundle, backend=backend, device="cuda:0")
    got = gpu.predict(val_paths)
    assert np.abs(got.probs - cpu.probs).max() <= tol
    assert np.mean(np.array(got.top1) == np.array(cpu.top1)) >= 0.95
    if backend == "auto":
        assert gpu.backend == "pt2"


def test_onnx_on_cuda_uses_iobinding_and_can_keep_outputs_on_the_gpu(cuda_bundle):
    from export.formats import open_runtime, ort_session

    session = ort_session(cuda_bundle / "model.onnx", device="cuda:0")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    run = open_runtime(cuda_bundle / "model.onnx", "onnx", device="cuda:0", keep_on_device=True)
    on_gpu, from_gpu_input = run(x), run(x.cuda())
    assert on_gpu.is_cuda and on_gpu.shape == (4, 3) and torch.equal(on_gpu, from_gpu_input)
    cpu = open_runtime(cuda_bundle / "model.onnx", "onnx")(x)
    assert (on_gpu.cpu() - cpu).abs().max() <= 1e-3


def test_a_cpu_only_bundle_on_cuda_runs_onnx_or_says_what_to_re_export(cuda_bundle, tmp_path):
    import json
    import shutil

    cpu_only = tmp_path / "cpu_only"
    shutil.copytree(cuda_bundle, cpu_only)
    m = json.loads((cpu_only / "manifest.json").read_text())
    m["artifacts"] = {k: v for k, v in m["artifacts"].items() if v.get("device", "cpu") == "cpu"}
    (cpu_only / "manifest.json").write_text(json.dumps(m))
    assert export.load_bundle(cpu_only, device="cuda").backend == "onnxruntime"
    with pytest.raises(export.BundleError, match="re-export it on a GPU machine"):
        export.load_bundle(cpu_only, backend="pt2", device="cuda")


def test_a_device_index_beyond_the_machine_is_refused(cuda_bundle):
    n = torch.cuda.device_count()
    with pytest.raises(export.BundleError, match=f"has {n} CUDA device"):
        export.load_bundle(cuda_bundle, device=f"cuda:{n}")
