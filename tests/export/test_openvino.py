"""The OpenVINO backends, precision (fp32 / bf16 / auto) and the bf16 verification at export; the
loader's torch thread count and its import of the native plugin.

    PYTHONPATH=$PWD/python:$PWD .venv/bin/python -m pytest -q tests/export/test_openvino.py

Runs on any x86 CPU: where the CPU has no native bf16, the tests that need real bf16 numerics play
one with a faked CpuRecord (export.openvino_backend), and the refusals are tested with a faked CPU
without it everywhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from export_testlib import export_cli, write_checkpoint

import export
from export import openvino_backend as ovb
from export.build import ExportOptions, build_bundle
from export.loader import resolve_precision
from export.manifest import BundleError, read_manifest, validate_manifest

pytest.importorskip("openvino")
NATIVE_BF16 = ovb.CpuRecord(frozenset({"avx512f", "avx512_bf16", "amx_bf16"}), frozenset({"FP32", "BF16"}))
NO_BF16 = ovb.CpuRecord(frozenset({"avx2", "fma"}), frozenset({"FP32", "INT8"}))
# a manifest whose model.onnx records bf16 verified at export (within the gate)
BF16_VERIFIED = {"artifacts": {"onnx": {"precision_checks": {"bf16": {"top1_drop": 0.0, "validation_images": 50,
                                                                       "max_accuracy_drop": 1.0}}}}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained resnet18 for the tiny_digits classes: its probabilities are spread (a briefly trained
    one saturates at 1.0, where bf16 and fp32 agree exactly and nothing is measured), its top-1 is chance."""
    return write_checkpoint(tmp_path_factory.mktemp("ov_run") / "untrained.pt", "resnet18", seed=3)


def _build(checkpoint, out: Path, data, **kw) -> Path:
    build_bundle(ExportOptions(checkpoint=str(checkpoint), out=str(out), max_batch=8, data=str(data), **kw),
                 say=lambda *a, **k: None)
    return out


@pytest.fixture(scope="module")
def plain(checkpoint, tiny_digits, tmp_path_factory) -> Path:
    """ONNX + int8 ONNX + TorchScript, no bf16 verification."""
    return _build(checkpoint, tmp_path_factory.mktemp("ov") / "plain", tiny_digits, formats=["onnx", "torchscript"],
                  quantize="int8", calibration=str(tiny_digits / "train"), max_accuracy_drop=100.0)


@pytest.fixture(scope="module")
def verified(checkpoint, tiny_digits, tmp_path_factory) -> Path:
    """ONNX exported with --verify-precision bf16 through the command line (a bf16 CPU played where
    this one has none: the record is then made from fp32 numerics, which the manifest cannot tell)."""
    if ovb.onednn_cap_hides_bf16():   # the CPU-without-bf16 run of docs/trainer.md
        pytest.skip(f"{ovb.ONEDNN_ISA_ENV}={os.environ[ovb.ONEDNN_ISA_ENV]}: OpenVINO cannot compile bf16 under "
                    "this cap (a real AVX2 CPU runs the bf16 request in fp32); the no-bf16 choices are tested "
                    "by test_no_bf16_env_plays_a_cpu_without_bf16_for_every_choice")
    # OpenVINO's own answer, not cpu_record()'s: SHIPCLASSIFIER_NO_BF16 hides BF16 there, and OpenVINO still
    # compiles bf16 under it
    capabilities = ovb.shared_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:   # an AVX2-only CPU (an AMD EPYC without AVX-512 here, 2026-12-06)
        pytest.skip(f"OpenVINO cannot compile bf16 on this CPU (capabilities {','.join(capabilities)}); the "
                    "refusal there is tested by test_verify_precision_refused_on_a_cpu_without_bf16")
    out = tmp_path_factory.mktemp("ov") / "verified"
    with pytest.MonkeyPatch.context() as mp:
        if not ovb.cpu_native_bf16():
            mp.setattr(ovb, "_CPU", NATIVE_BF16)
        code, _ = export_cli("--checkpoint", checkpoint, "--format", "onnx", "--verify-precision", "bf16",
                             "--data", tiny_digits, "--out", out, "--max-batch", "8", "--max-accuracy-drop", "10")
    assert code == 0
    return out


@pytest.fixture
def val_images(tiny_digits):
    from trainer.data import decode_image

    return [decode_image(p) for p in sorted((tiny_digits / "val").rglob("*.png"))]


def test_openvino_matches_eager_on_real_images(plain, checkpoint, val_images):
    eager = export.load_bundle(plain, backend="eager", tta="none").predict(val_images).probs
    bundle = export.load_bundle(plain, backend="openvino", tta="none", threads=2, precision="fp32")
    assert (bundle.backend, bundle.precision) == ("openvino", "fp32")
    assert bundle._run.config == {"INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_PRECISION_HINT": "f32", "compiled_precision": "f32"}
    got = bundle.predict(val_images)
    np.testing.assert_allclose(got.probs, eager, atol=1e-4, rtol=0)
    assert (got.indices[:, 0] == eager.argmax(1)).all()
    # int8: the same QDQ model as onnxruntime-int8 runs; kernels differ, so top-1 agreement, not 1e-4
    ort8 = export.load_bundle(plain, backend="onnxruntime-int8", tta="none").predict(val_images).probs
    ov8 = export.load_bundle(plain, backend="openvino-int8", tta="none", threads=1).predict(val_images).probs
    assert (ov8.argmax(1) == ort8.argmax(1)).mean() >= 0.9
    assert np.abs(ov8 - ort8).max() < 0.1


def test_openvino_calls_from_several_threads_at_once(plain, val_images):
    from concurrent.futures import ThreadPoolExecutor

    bundle = export.load_bundle(plain, backend="openvino", tta="none", threads=1, precision="fp32")
    want = bundle.predict(val_images).probs
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: bundle.predict(val_images).probs, range(8)))
    for out in outs:
        np.testing.assert_array_equal(out, want)


def test_bf16_verification_is_recorded_and_auto_uses_it_only_where_native(verified, plain, val_images, monkeypatch):
    m = read_manifest(verified)
    validate_manifest(m)
    check = m["artifacts"]["onnx"]["precision_checks"]["bf16"]
    assert check["validation_images"] == 24 and check["runtime"].startswith("openvino ")
    assert check["top1_drop"] <= 10 and check["max_accuracy_drop"] == 10
    assert check["correct_fp32"] == round(check["top1_fp32"] * 24) and 0 <= check["max_prob_gap"] < 0.2
    if ovb.cpu_native_bf16():   # real bf16 numerics: close to fp32, not equal
        auto = export.load_bundle(verified, backend="openvino", tta="none")
        assert auto.precision == "bf16" and "verified at export" in auto.precision_reason
        assert auto._run.config["compiled_precision"] == "bf16"
        fp32 = export.load_bundle(verified, backend="openvino", tta="none", precision="fp32").predict(val_images)
        got = auto.predict(val_images).probs
        assert 0 < np.abs(got - fp32.probs).max() < 0.05
    # an unverified bundle stays fp32 under auto, even on a bf16 CPU
    unverified = export.load_bundle(plain, backend="openvino", tta="none")
    assert unverified.precision == "fp32" and "no bf16 verification" in unverified.precision_reason
    # a CPU without native bf16 stays fp32 under auto, even on a verified bundle, and refuses bf16 asked for
    monkeypatch.setattr(ovb, "_CPU", NO_BF16)
    assert export.load_bundle(verified, backend="openvino").precision == "fp32"
    with pytest.raises(BundleError, match="native bf16"):
        export.load_bundle(verified, backend="openvino", precision="bf16")
    # the default backend (onnxruntime) is fp32 whatever the bundle says
    assert export.load_bundle(verified).backend == "onnxruntime"
    assert export.load_bundle(verified).precision == "fp32"


def test_resolve_precision_rules():
    m_verified = BF16_VERIFIED
    m_plain = {"artifacts": {"onnx": {}}}
    assert resolve_precision(m_verified, "openvino", "auto", NATIVE_BF16)[0] == "bf16"
    assert resolve_precision(m_verified, "openvino", "auto", NO_BF16)[0] == "fp32"
    assert resolve_precision(m_plain, "openvino", "auto", NATIVE_BF16)[0] == "fp32"
    assert resolve_precision(m_verified, "onnxruntime", "auto", NATIVE_BF16)[0] == "fp32"
    assert resolve_precision(m_verified, "openvino-int8", "auto", NATIVE_BF16)[0] == "fp32"
    assert resolve_precision(m_plain, "openvino", "bf16", NATIVE_BF16)[0] == "bf16"   # explicit: warned, run
    with pytest.raises(BundleError, match="runs fp32 only"):
        resolve_precision(m_verified, "onnxruntime", "bf16", NATIVE_BF16)
    with pytest.raises(BundleError, match="native bf16"):
        resolve_precision(m_verified, "openvino", "bf16", NO_BF16)
    with pytest.raises(BundleError, match="unknown precision"):
        resolve_precision(m_verified, "openvino", "fp16", NATIVE_BF16)


def test_cpu_record_reads_flags_and_openvino_capabilities(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert ovb.read_cpu_flags(str(info)) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert ovb.CpuRecord(frozenset({"avx512_bf16"}), frozenset({"FP32", "BF16"})).native_bf16
    # ONEDNN_MAX_CPU_ISA=AVX2 and the like: the hardware has it, OpenVINO will not use it
    assert not ovb.CpuRecord(frozenset({"avx512_bf16"}), frozenset({"FP32"})).native_bf16
    assert not ovb.CpuRecord(frozenset({"avx2"}), frozenset({"FP32", "BF16"})).native_bf16


def test_no_bf16_env_plays_a_cpu_without_bf16_for_every_choice(monkeypatch):
    """SHIPCLASSIFIER_NO_BF16=1 hides bf16 from the flags and from OpenVINO's capabilities (OpenVINO ignores
    ONEDNN_MAX_CPU_ISA): auto stays fp32 on a verified bundle and bf16 asked for is refused, as on an AVX2 CPU."""
    monkeypatch.setattr(ovb, "read_cpu_flags", lambda path=ovb.CPUINFO: frozenset({"avx2", "avx512_bf16",
                                                                                       "amx_bf16"}))
    monkeypatch.setattr(ovb, "_CPU", None)
    monkeypatch.setenv(ovb.NO_BF16_ENV, "1")
    cpu = ovb.cpu_record()
    assert not cpu.native_bf16 and not cpu.flags & set(ovb.BF16_CPU_FLAGS) and "BF16" not in cpu.ov_capabilities
    assert ovb.NO_BF16_ENV in cpu.describe() and "avx2" in cpu.flags
    assert resolve_precision(BF16_VERIFIED, "openvino", "auto") == ("fp32", f"{cpu.describe()}: fp32")
    with pytest.raises(BundleError, match="native bf16"):
        resolve_precision(BF16_VERIFIED, "openvino", "bf16")
    monkeypatch.setenv(ovb.NO_BF16_ENV, "0")   # 0 or empty: the machine as it is
    monkeypatch.delenv(ovb.ONEDNN_ISA_ENV, raising=False)
    assert ovb.cpu_record(refresh=True).flags & set(ovb.BF16_CPU_FLAGS)


@pytest.mark.parametrize("cap, hidden", [("AVX2", True), ("avx512_core", True), ("AVX2_VNNI", True),
                                         ("AVX512_CORE_BF16", False), ("AVX512_CORE_AMX", False), ("", False)])
def test_a_onednn_isa_cap_below_bf16_hides_bf16(monkeypatch, cap, hidden):
    """ONEDNN_MAX_CPU_ISA=AVX2: OpenVINO still reports BF16 but cannot compile bf16 layers (a pooling layer
    had no kernel), so auto must stay fp32 rather than fail to load the model."""
    monkeypatch.setattr(ovb, "read_cpu_flags", lambda path=ovb.CPUINFO: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(ovb, "_CPU", None)
    monkeypatch.delenv(ovb.NO_BF16_ENV, raising=False)
    monkeypatch.setenv(ovb.ONEDNN_ISA_ENV, cap)
    cpu = ovb.cpu_record()
    assert ("avx512_bf16" not in cpu.flags) == hidden and (ovb.ONEDNN_ISA_ENV in cpu.describe()) == hidden
    if hidden:
        assert resolve_precision(BF16_VERIFIED, "openvino", "auto") == ("fp32", f"{cpu.describe()}: fp32")


class _WrongOnEveryImage:
    """A "bf16 runtime" that answers a wrong class for every labelled validation image: the gate must refuse it."""
    def __init__(self, checkpoint, data):
        from trainer.inference import model_from_checkpoint

        from export.samples import validation_images

        loaded = model_from_checkpoint(str(checkpoint))
        val = validation_images(loaded.preprocess, loaded.classes, str(data))
        self.wrong = {x.numpy().tobytes(): (y + 1) % 3 for x, y in zip(val.images, val.labels)}
        self.config = {"compiled_precision": "bf16"}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.eye(3)[[self.wrong[img.numpy().tobytes()] for img in x]]


def test_bf16_that_loses_top1_is_refused_and_no_bundle_is_written(checkpoint, tiny_digits, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(ovb, "_CPU", NATIVE_BF16)
    wrong = _WrongOnEveryImage(checkpoint, tiny_digits)
    monkeypatch.setattr(ovb, "open_openvino", lambda *a, **k: wrong)
    out = tmp_path / "refused"
    code, err = export_cli("--checkpoint", checkpoint, "--format", "onnx", "--verify-precision", "bf16", "--data",
                           tiny_digits, "--out", out, "--max-batch", "8", capsys=capsys)
    assert code == 1
    assert "bf16: top-1" in err and "more than --max-accuracy-drop 1" in err and "No bundle was written" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_verify_precision_refused_on_a_cpu_without_bf16(checkpoint, tiny_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ovb, "_CPU", NO_BF16)
    code, err = export_cli("--checkpoint", checkpoint, "--format", "onnx", "--verify-precision", "bf16", "--data",
                           tiny_digits, "--out", tmp_path / "b", capsys=capsys)
    assert code == 2 and "needs a CPU with native bf16" in err and not (tmp_path / "b").exists()


def test_a_torch_backend_load_leaves_torch_threads_alone(plain, val_images, monkeypatch):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    bundle = export.load_bundle(plain, backend="torchscript", tta="none", threads=other)
    # the load's one warm-up call (check_output_width) set it for that call and restored it
    assert torch.get_num_threads() == before and seen == [other, before]
    bundle.predict(val_images[:2])
    assert seen == [other, before] * 2 and torch.get_num_threads() == before


def test_the_loader_and_the_native_plugin_do_not_import_each_other(plain, native):
    code = "import sys, classify_native; assert 'export.loader' not in sys.modules, 'the plugin imported the loader'"
    env_path = f"{REPO / 'python'}:{REPO}"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    code = ("import sys, export\nassert 'classify_native' not in sys.modules, 'the loader imported the plugin'\n"
            f"b = export.load_bundle({json.dumps(str(plain))}, backend='native', tta='none')\n"
            "assert b.backend == 'native' and 'classify_native' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})


def test_server_and_worker_take_backend_and_precision(plain, capsys):
    from server.__main__ import config_from_args
    from server.models import load_served_model
    from server.worker import main as worker_main

    cfg, _ = config_from_args(["--bundle", str(plain), "--backend", "openvino", "--precision", "fp32"])
    assert (cfg.backend, cfg.precision) == ("openvino", "fp32")
    with pytest.raises(SystemExit):
        config_from_args(["--bundle", str(plain), "--precision", "fp16"])
    # the worker hands --precision to the loader: bf16 on onnxruntime is refused at start-up, naming the fix
    assert worker_main(["--redis-url", "redis://127.0.0.1:9/0", "--bundle", str(plain), "--backend", "onnxruntime",
                        "--precision", "bf16"]) == 2
    assert "runs fp32 only; use backend 'openvino'" in capsys.readouterr().err
    served = load_served_model(plain, backend="openvino", threads=1, precision="fp32")   # the worker's path
    assert served.execution() == {"device": "cpu", "backend": "openvino", "provider": "OpenVINO CPU"}
