"""Device selection without a GPU: parsing, onnxruntime provider choice and refusal, CUDA artifact
picking, and the CPU-only machine staying quiet. The CUDA runs themselves are in test_cuda.py (-m gpu).

    pytest -q tests/export/test_devices.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_testlib import export_cli, write_checkpoint

import export
from export import devices, formats, loader
from export.devices import Device, parse_device
from export.manifest import ARTIFACT_FILES, artifact_key, validate_manifest

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, want", [("cpu", Device("cpu")), ("cuda", Device("cuda", 0)),
                                        ("cuda:3", Device("cuda", 3)), (" cuda:0 ", Device("cuda", 0))])
def test_parse_device(text, want):
    assert parse_device(text) == want and str(parse_device(str(want))) == str(want)


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cpu:0", "cuda:-1", "CUDA", ""])
def test_parse_device_refuses_unknown_names(text):
    with pytest.raises(export.BundleError, match="use cpu, cuda or cuda:N"):
        parse_device(text)


def test_cuda_artifact_names():
    assert artifact_key("pt2", "cuda") == "pt2_cuda" and artifact_key("torchscript", "cpu") == "torchscript"
    assert ARTIFACT_FILES["pt2_cuda"] == ("model.cuda.pt2", "aotinductor")
    assert ARTIFACT_FILES["torchscript_cuda_fp16"] == ("model.cuda.fp16.ts", "torchscript")
    assert ARTIFACT_FILES[artifact_key("pt2", "cuda", "bf16")][0] == "model.cuda.bf16.pt2"


# ---- onnxruntime: the device index reaches the provider; a CPU fallback is an error ----------
class FakeSession:
    def __init__(self, path, sess_options=None, providers=None, got=None):
        self.providers, self.options = providers, sess_options
        self._got = got if got is not None else [p[0] if isinstance(p, tuple) else p for p in providers]

    def get_providers(self):
        return self._got


@pytest.fixture
def fake_gpu_ort(monkeypatch):
    """onnxruntime-gpu on a machine with two GPUs, as far as ort_session can tell."""
    import onnxruntime as ort

    made = []
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(devices, "preload_cuda_libraries", lambda: None)
    monkeypatch.setattr(formats, "preload_cuda_libraries", lambda: None)

    def install(got=None):
        def session(path, sess_options=None, providers=None):
            made.append(FakeSession(path, sess_options, providers, got))
            return made[-1]
        monkeypatch.setattr(ort, "InferenceSession", session)
        return made

    return install


def test_ort_session_pins_the_cuda_device_index(fake_gpu_ort):
    made = fake_gpu_ort()
    formats.ort_session("m.onnx", device="cuda:1")
    assert made[0].providers == [("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]
    formats.ort_session("m.onnx", device="cuda", tensorrt=True)
    assert [p[0] for p in made[1].providers[:2]] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert made[1].providers[0][1] == {"device_id": "0"}


def test_cpu_sessions_with_a_thread_pool_stop_spinning_when_a_run_returns(fake_gpu_ort):
    """A pool that spins after a run takes the cores the caller's next steps need (a lone server
    request's answer: p99 10-13 ms instead of 4.6 on 2 cores); single-thread and CUDA sessions have no
    such pool."""
    def spin_stop(opts):
        try:
            return opts.get_session_config_entry(formats.ORT_SPIN_STOP)
        except RuntimeError:   # onnxruntime: no such entry
            return None

    made = fake_gpu_ort()
    for threads in (2, None, 1):
        formats.ort_session("m.onnx", threads=threads)
    formats.ort_session("m.onnx", threads=2, device="cuda:0")
    assert formats.ORT_SPIN_STOP == "session.force_spinning_stop"
    assert [spin_stop(m.options) for m in made] == ["1", "1", None, None]


def test_ort_session_refuses_a_silent_cpu_fallback(fake_gpu_ort):
    fake_gpu_ort(got=["CPUExecutionProvider"])  # what onnxruntime does when libcublas is missing
    with pytest.raises(export.BundleError, match="fell back to the CPU"):
        formats.ort_session("m.onnx", device="cuda:0")


def test_ort_session_refuses_a_missing_tensorrt(fake_gpu_ort):
    fake_gpu_ort(got=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(export.BundleError, match="TensorrtExecutionProvider"):
        formats.ort_session("m.onnx", device="cuda:0", tensorrt=True)


def test_ort_session_refuses_a_device_index_out_of_range(fake_gpu_ort):
    fake_gpu_ort()
    with pytest.raises(export.BundleError, match=r"has 2 CUDA device\(s\); use cuda:0..cuda:1"):
        formats.ort_session("m.onnx", device="cuda:2")


def test_ort_session_without_the_cuda_provider_names_the_package(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    with pytest.raises(export.BundleError, match="needs onnxruntime-gpu"):
        formats.ort_session("m.onnx", device="cuda")


def test_tensorrt_needs_cuda():
    with pytest.raises(export.BundleError, match="TensorRT needs a CUDA device"):
        devices.ort_providers(Device("cpu"), tensorrt=True)


# ---- which artifact a device gets -------------------------------------------------------------
def _manifest(*keys: str) -> dict:
    arts = {}
    for k in keys:
        file, kind = ARTIFACT_FILES[k]
        art = {"file": file, "format": kind, "sha256": "0" * 64, "bytes": 1}
        if k.startswith(("pt2_cuda", "torchscript_cuda")):
            art.update(device="cuda", precision=k.rsplit("_", 1)[-1] if k.endswith(("fp16", "bf16")) else "fp32")
        arts[k] = art
    return {"artifacts": arts}


def test_cuda_picks_the_artifact_compiled_for_cuda():
    m = _manifest("pt2", "pt2_cuda", "pt2_cuda_fp16", "torchscript")
    cuda = Device("cuda", 1)
    assert loader.compiled_artifact(m, "pt2", cuda) == "pt2_cuda"
    assert loader.compiled_artifact(m, "pt2", cuda, "fp16") == "pt2_cuda_fp16"
    assert loader.compiled_artifact(m, "pt2", Device("cpu")) == "pt2"
    with pytest.raises(export.BundleError, match=r"no torchscript artifact compiled for CUDA.*--device cuda'.*"
                                                 r"backend 'onnxruntime'"):
        loader.compiled_artifact(m, "torchscript", cuda)
    with pytest.raises(export.BundleError, match="--device cuda --precision bf16"):
        loader.compiled_artifact(m, "pt2", cuda, "bf16")
    with pytest.raises(export.BundleError, match="runs the fp16 CUDA artifacts; use device='cuda'"):
        loader.compiled_artifact(m, "pt2", Device("cpu"), "fp16")


@pytest.mark.parametrize("keys, want", [(("onnx", "pt2", "pt2_cuda"), "pt2"),
                                        (("onnx", "torchscript_cuda"), "torchscript"),
                                        (("onnx", "pt2", "torchscript"), "onnxruntime")])
def test_auto_on_cuda_prefers_compiled_artifacts_then_onnx(keys, want):
    assert loader._pick_backend(_manifest(*keys), "auto", Path("b"), Device("cuda")) == want
    assert loader._pick_backend(_manifest(*keys), "auto", Path("b"), Device("cpu")) == \
        ("onnxruntime" if "onnx" in keys else "pt2")


def test_auto_on_cuda_without_any_cuda_artifact_says_what_to_re_export():
    with pytest.raises(export.BundleError, match="no artifact that runs on CUDA.*--device cuda"):
        loader._pick_backend(_manifest("pt2", "torchscript"), "auto", Path("b"), Device("cuda"))


@pytest.mark.parametrize("field, value", [("device", "tpu"), ("precision", "fp8")])
def test_manifest_refuses_unknown_device_or_precision(field, value):
    from trainer.data import PreprocessSpec

    from export.manifest import preprocessing_dict

    art = {**_manifest("pt2")["artifacts"]["pt2"], field: value}
    m = {"schema_version": 1, "kind": "model", "name": "x", "version": "v", "architecture": "a", "classes": ["a", "b"],
         "preprocessing": preprocessing_dict(PreprocessSpec.for_size(32)),
         "input": {"name": "images", "dtype": "uint8", "shape": [-1, 3, 32, 32]},
         "output": {"name": "probs", "dtype": "float32", "shape": [-1, 2]},
         "max_batch": 2, "tta": {"default": "none", "merge": "mean", "views": [{}]}, "artifacts": {"pt2": art},
         "provenance": {}}
    validate_manifest({**m, "artifacts": {"pt2": _manifest("pt2")["artifacts"]["pt2"]}})
    with pytest.raises(export.BundleError, match=rf"artifacts\.pt2\.{field}: '{value}' is not one of") as e:
        validate_manifest(m)
    assert e.value.category == "schema"


# ---- the fp16/bf16 top-1 check (CPU stand-ins for the GPU runtimes) ----------------------------
def _runs(flipped: int):
    def ref(x):
        return torch.tensor([[0.9, 0.1]]).repeat(x.shape[0], 1)

    def half(x):
        out = ref(x)
        out[:flipped] = torch.tensor([0.2, 0.8])
        return out

    return ref, half


@pytest.mark.parametrize("labelled", [True, False])
def test_half_precision_may_lose_one_point_of_top1_not_more(labelled):
    from export.cuda_export import half_quality
    from export.samples import ImageSet
    from export.verify import ParityError

    val = ImageSet(torch.zeros(100, 3, 2, 2, dtype=torch.uint8), [0] * 100 if labelled else None, "val")
    q = half_quality(*_runs(1), val, max_batch=100, precision="fp16")
    assert q["top1_agreement"] == 0.99 and (q["top1_fp16"] == 0.99 if labelled else "top1_fp16" not in q)
    with pytest.raises(ParityError, match="fp16: top-1 .* on 100 images from val: more than 1 point"):
        half_quality(*_runs(2), val, max_batch=100, precision="fp16")


# ---- refusals on a machine without CUDA -------------------------------------------------------
@NO_CUDA
def test_export_device_cuda_is_refused_before_any_work(tmp_path, capsys):
    # the checkpoint does not even exist: the device is checked first, before anything is loaded
    code, err = export_cli("--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "b", "--device", "cuda",
                           capsys=capsys)
    assert code == 2 and "--device cuda:0: no CUDA device is usable here" in err and "not found" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, message", [(["--device", "gpu"], "unknown device 'gpu'"),
                                           (["--precision", "fp16"], "fp16/bf16 variants are CUDA artifacts"),
                                           (["--device", "cuda", "--precision", "fp8"], "--precision ['fp8']")])
def test_export_device_flag_errors(tmp_path, capsys, args, message):
    code, err = export_cli("--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "b", *args, capsys=capsys)
    assert code == 2 and message in err, err


@NO_CUDA
@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "pt2", "eager"])
def test_load_bundle_on_cuda_without_cuda_is_refused(tmp_path, backend):
    # refused before the bundle is even read: the folder need not exist
    with pytest.raises(export.BundleError, match="device cuda:0: no CUDA device is usable here"):
        export.load_bundle(tmp_path / "missing", backend=backend, device="cuda")


def test_tensorrt_backend_needs_cuda(tmp_path):
    with pytest.raises(export.BundleError, match="'onnxruntime-tensorrt' needs device='cuda"):
        loader._tensorrt_factory(tmp_path, {"artifacts": {}}, None, "cpu")


def test_load_bundle_refuses_an_unknown_device(tmp_path):
    with pytest.raises(export.BundleError, match="unknown device 'cuda0'"):
        export.load_bundle(tmp_path, device="cuda0")


# ---- the CPU-only machine stays quiet ---------------------------------------------------------
QUIET_SCRIPT = """
import sys, numpy as np, onnx, torch
from onnx import TensorProto, helper
from export.formats import open_runtime
x = helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, 2, 2])
y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 12])
g = helper.make_graph([helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
                       helper.make_node("Flatten", ["f"], ["flat"]),
                       helper.make_node("Softmax", ["flat"], ["probs"], axis=-1)], "g", [x], [y])
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), sys.argv[1])
out = open_runtime(sys.argv[1], "onnx", threads=1)(torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
assert out.shape == (2, 12) and abs(float(out.sum()) - 2.0) < 1e-5
import onnxruntime; print(onnxruntime.__version__, onnxruntime.get_available_providers())
"""


def test_cpu_inference_prints_nothing_but_its_result(tmp_path):
    """Whichever onnxruntime is installed (onnxruntime-gpu on Linux x86-64), a CPU session on a
    machine without a GPU writes nothing to stderr: no provider warnings, no CUDA probing."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # keeps a /tmp/ortgpu in front
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO / "python"), str(REPO)])}
    res = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, str(tmp_path / "m.onnx")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    assert "CPUExecutionProvider" in res.stdout
