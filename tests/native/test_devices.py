"""The native runtime and devices: refusals on a machine without CUDA (always run), and CUDA bundles
through the classify binary and the pybind11 module against Python on the GPU (``-m gpu``).

    pytest -q tests/native/test_devices.py
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from export import load_bundle

from .conftest import _export, _train

pytestmark = pytest.mark.slow  # shares the trained/exported bundles with test_runtime.py
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def classify(bin_path, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_path), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_binary_starts_and_reports_its_device(classify_bin, bundle_a):
    """Linked against torch_cuda, the binary must still start and run on a machine without a GPU."""
    res = classify(classify_bin, "--bundle", bundle_a, "--bench", 1, "--batch", 1, "--threads", 1)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["device"] == "cpu"


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_binary_refuses_cuda_without_cuda(classify_bin, bundle_a, image_dir, device):
    res = classify(classify_bin, "--bundle", bundle_a, "--device", device, image_dir / "rgb420.jpg")
    assert res.returncode == 2 and res.stdout == ""
    assert f"device '{device}' requested but no CUDA device is usable here" in res.stderr
    assert "use --device cpu" in res.stderr


@pytest.mark.parametrize("device, message", [("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device 'cuda:x'")])
def test_binary_refuses_unknown_devices(classify_bin, bundle_a, image_dir, device, message):
    res = classify(classify_bin, "--bundle", bundle_a, "--device", device, image_dir / "rgb420.jpg")
    assert res.returncode == 2 and message in res.stderr


def test_binary_refuses_a_precision_the_bundle_lacks(classify_bin, bundle_a, image_dir):
    res = classify(classify_bin, "--bundle", bundle_a, "--precision", "fp16", image_dir / "rgb420.jpg")
    assert res.returncode == 2 and "no 'pt2' or 'torchscript' artifact for cpu in fp16" in res.stderr, res.stderr
    res = classify(classify_bin, "--bundle", bundle_a, "--precision", "fp8", image_dir / "rgb420.jpg")
    assert res.returncode == 2 and "unknown precision 'fp8'" in res.stderr


@NO_CUDA
def test_module_refuses_cuda_without_cuda(native, bundle_a):
    with pytest.raises(native.OptionError, match="no CUDA device is usable here"):
        native.Runtime(str(bundle_a), device="cuda")
    assert native.Runtime(str(bundle_a), threads=1).device == "cpu"


def test_cpu_artifacts_are_picked_by_the_manifest_device(native, bundle_a, tmp_path, image_dir):
    """A manifest whose only .pt2 is marked for CUDA has no CPU .pt2: the runtime says so and what to do."""
    copy = tmp_path / "b"
    shutil.copytree(bundle_a, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["artifacts"]["pt2"]["device"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(native.BundleError, match=r"no 'pt2' artifact for cpu in fp32 \(it has: .*pt2 \(cuda, fp32\)"):
        native.Runtime(str(copy), format="pt2")
    assert native.Runtime(str(copy), threads=1).format == "torchscript"  # auto: the CPU artifact there is
    m["artifacts"]["pt2"]["device"] = "tpu"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(native.BundleError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        native.Runtime(str(copy))


def test_bundles_from_before_the_device_field_still_load(native, bundle_a, tmp_path):
    """Manifests written before CPU/CUDA artifacts existed have no device or precision: CPU, fp32."""
    copy = tmp_path / "old"
    shutil.copytree(bundle_a, copy)
    m = json.loads((copy / "manifest.json").read_text())
    for art in m["artifacts"].values():
        art.pop("device", None)
        art.pop("precision", None)
    (copy / "manifest.json").write_text(json.dumps(m))
    for fmt in ("pt2", "torchscript"):
        assert native.Runtime(str(copy), format=fmt, threads=1).format == fmt
    assert load_bundle(copy, backend="pt2").backend == "pt2"


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_bundle(tiny_digits, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("native_cuda")
    return _export(_train(tiny_digits, root / "run", seed=0), root / "bundle", ["torchscript", "pt2"],
                   data=str(tiny_digits), device="cuda", precisions=["fp32", "fp16"], pt2_static_batches=[])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_module_on_cuda_matches_python_on_cuda(native, cuda_bundle, eval_images, fmt):
    rt = native.Runtime(str(cuda_bundle), format=fmt, device="cuda:0", tta="hflip")
    assert rt.device == "cuda:0" and rt.format == fmt
    ref = load_bundle(cuda_bundle, backend=fmt, device="cuda:0", tta="hflip").predict(eval_images, topk=3)
    out = rt.predict_files(eval_images, topk=3)
    for o, probs in zip(out, ref.probs):
        assert o["error"] is None
        for t in o["topk"]:
            assert abs(t["prob"] - probs[t["index"]]) <= 1e-4


@pytest.mark.gpu
def test_binary_on_cuda_matches_the_cpu(classify_bin, cuda_bundle, eval_images):
    gpu = classify(classify_bin, "--bundle", cuda_bundle, "--device", "cuda", "--topk", 3, *eval_images)
    cpu = classify(classify_bin, "--bundle", cuda_bundle, "--device", "cpu", "--topk", 3, *eval_images)
    assert gpu.returncode == 0 and cpu.returncode == 0, gpu.stderr + cpu.stderr
    g = [json.loads(x) for x in gpu.stdout.splitlines()]
    c = [json.loads(x) for x in cpu.stdout.splitlines()]
    assert [x["topk"][0]["index"] for x in g] == [x["topk"][0]["index"] for x in c]
    assert max(abs(a["prob"] - b["prob"]) for x, y in zip(g, c) for a, b in zip(x["topk"], y["topk"])) <= 1e-3
    half = classify(classify_bin, "--bundle", cuda_bundle, "--device", "cuda:0", "--precision", "fp16", *eval_images)
    assert half.returncode == 0, half.stderr
    bench = classify(classify_bin, "--bundle", cuda_bundle, "--device", "cuda:0", "--bench", 3, "--batch", 8)
    assert json.loads(bench.stdout.splitlines()[-1])["device"] == "cuda:0"


@pytest.mark.gpu
def test_cuda_index_beyond_the_machine_is_refused(classify_bin, cuda_bundle, eval_images):
    n = torch.cuda.device_count()
    res = classify(classify_bin, "--bundle", cuda_bundle, "--device", f"cuda:{n}", eval_images[0])
    assert res.returncode == 2 and f"this machine has {n} CUDA device(s)" in res.stderr


@pytest.mark.gpu
def test_native_backend_of_the_loader_runs_on_cuda(native, cuda_bundle, eval_images):
    gpu = load_bundle(cuda_bundle, backend="native", device="cuda").predict(eval_images)
    cpu = load_bundle(cuda_bundle, backend="native").predict(eval_images)
    assert np.abs(gpu.probs - cpu.probs).max() <= 1e-3
