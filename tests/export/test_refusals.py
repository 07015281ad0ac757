"""Bad inputs: every refusal exits 2 (or raises BundleError) with a message that names the problem,
and a failed parity check aborts without leaving anything behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from export_testlib import TINY_CLASSES, export_cli, write_checkpoint

import export
from export import formats
from export.build import ExportOptions, build_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, bundle): untrained mobilenet_v3_small, TorchScript + ONNX, checked on synthetic images."""
    root = tmp_path_factory.mktemp("small")
    ckpt = write_checkpoint(root / "ckpt.pt", "mobilenet_v3_small")
    out, m = build_bundle(ExportOptions(str(ckpt), str(root / "bundle"), ["torchscript", "onnx"], max_batch=4),
                          say=lambda *_: None)
    assert m["provenance"]["verified_on"] == "synthetic"
    assert m["artifacts"]["onnx"]["parity"]["batch_sizes"] == [1, 2, 3]
    return ckpt, out


@pytest.fixture
def bundle_copy(small, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(small[1], dst)
    return dst


def _edit_manifest(bundle: Path, **changes) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_missing_checkpoint(tmp_path, capsys):
    code, err = export_cli("--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "b", capsys=capsys)
    assert code == 2 and "not found" in err and not (tmp_path / "b").exists()


def test_corrupt_checkpoint(small, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(small[0].read_bytes()[:5000])
    code, err = export_cli("--checkpoint", bad, "--out", tmp_path / "b", capsys=capsys)
    assert code == 2 and "corrupt" in err


def test_unknown_format(small, tmp_path, capsys):
    code, err = export_cli("--checkpoint", small[0], "--format", "tflite", "--out", tmp_path / "b", capsys=capsys)
    assert code == 2 and "unknown format 'tflite'" in err


def test_checkpoint_with_another_class_count(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "c.pt", "mobilenet_v3_small", num_classes=5)  # 3-class weights
    code, err = export_cli("--checkpoint", ckpt, "--out", tmp_path / "b", capsys=capsys)
    assert code == 2 and "5 classes" in err


def test_pt2_static_batch_outside_the_batch_range(small, tmp_path, capsys):
    code, err = export_cli("--checkpoint", small[0], "--format", "pt2", "--max-batch", "4", "--pt2-static-batches",
                           "1", "8", "--out", tmp_path / "b", capsys=capsys)
    assert code == 2 and "--pt2-static-batches [8]" in err and not (tmp_path / "b").exists()


def test_int8_needs_calibration(small, tmp_path, capsys):
    code, err = export_cli("--checkpoint", small[0], "--quantize", "int8", "--out", tmp_path / "b", capsys=capsys)
    assert code == 2 and "--calibration" in err


def test_existing_output_is_not_overwritten_without_force(small, capsys):
    code, err = export_cli("--checkpoint", small[0], "--out", small[1], capsys=capsys)
    assert code == 2 and "--force" in err and (small[1] / "manifest.json").is_file()


def test_tampered_artifact(bundle_copy, capsys):
    with open(bundle_copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    code, err = export_cli("verify", bundle_copy, capsys=capsys)
    assert code == 2 and "model.onnx" in err and "sha256" in err
    with pytest.raises(export.BundleError, match="sha256"):
        export.load_bundle(bundle_copy, backend="onnxruntime")
    export.load_bundle(bundle_copy, backend="torchscript")  # the untouched artifact still loads


def test_unknown_schema_version(bundle_copy, capsys):
    _edit_manifest(bundle_copy, schema_version=99)
    code, err = export_cli("inspect", bundle_copy, capsys=capsys)
    assert code == 2 and "schema_version 99" in err
    with pytest.raises(export.BundleError, match="schema_version"):
        export.load_bundle(bundle_copy)


def test_missing_key_and_absent_format(bundle_copy):
    with pytest.raises(export.BundleError, match="no 'pt2' artifact"):
        export.load_bundle(bundle_copy, backend="pt2")
    with pytest.raises(export.BundleError, match="unknown backend"):
        export.load_bundle(bundle_copy, backend="tensorrt")
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["classes"]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(export.BundleError, match="classes"):
        export.read_manifest(bundle_copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_cuda_artifacts_on_a_cpu_only_machine(bundle_copy):
    """A bundle exported on a GPU and copied here: its CUDA artifacts are checksummed, listed, and never
    run on the CPU; the CPU artifacts are picked and work."""
    from export.manifest import file_sha256

    (bundle_copy / "model.cuda.pt2").write_bytes(b"kernels for sm_90")  # not loadable here, by design
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["artifacts"]["pt2_cuda"] = {"file": "model.cuda.pt2", "format": "aotinductor", "bytes": 17, "device": "cuda",
                                  "precision": "fp32", "sha256": file_sha256(bundle_copy / "model.cuda.pt2"),
                                  "compiled_for": {"gpu": "NVIDIA H200", "capability": "9.0", "cuda": "13.0"}}
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    from export.audit import verify_bundle

    said: list[str] = []
    report = verify_bundle(str(bundle_copy), say=said.append)
    assert "  pt2_cuda: compiled for CUDA, not run (no GPU here; its sha256 was checked)" in said
    assert set(report["artifacts"]) == {"torchscript", "onnx"}
    assert export.load_bundle(bundle_copy).backend == "onnxruntime"
    with pytest.raises(export.BundleError, match="no CUDA device is usable here"):
        export.load_bundle(bundle_copy, backend="pt2", device="cuda")


def test_inspect_shows_where_cuda_artifacts_run(bundle_copy):
    from export.audit import describe

    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["artifacts"]["torchscript_cuda_fp16"] = {**m["artifacts"]["torchscript"], "device": "cuda", "precision": "fp16",
                                               "compiled_for": {"gpu": "NVIDIA H200"}}
    assert "[cuda fp16, NVIDIA H200]" in describe(m)


def test_eager_needs_the_source_checkpoint(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["provenance"]["checkpoint"] = str(bundle_copy / "gone.pt")
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(export.BundleError, match="source checkpoint"):
        export.load_bundle(bundle_copy, backend="eager")


def test_ensemble_members_with_different_classes(small, bundle_copy, tmp_path, capsys):
    _edit_manifest(bundle_copy, classes=["a", "b", "c"])
    code, err = export_cli("ensemble", "--members", small[1], bundle_copy, "--out", tmp_path / "e", capsys=capsys)
    assert code == 2 and "classes" in err and not (tmp_path / "e").exists()


def test_parity_failure_aborts_and_leaves_nothing(small, tmp_path, monkeypatch, capsys):
    real = formats.open_runtime

    def off_by_a_little(path, fmt, *a, **k):
        run = real(path, fmt, *a, **k)
        return run if fmt == "onnx" else (lambda x: run(x) + 3e-4 * torch.arange(x.shape[0]).view(-1, 1))

    monkeypatch.setattr(formats, "open_runtime", off_by_a_little)
    out = tmp_path / "sub" / "bundle"
    code, err = export_cli("--checkpoint", small[0], "--format", "torchscript", "onnx", "--out", out,
                           "--max-batch", "4", capsys=capsys)
    assert code == 1
    # batch 1 passes, batch 2 is off by 3e-4; the model.ts already written is removed with its temp folder
    assert "torchscript" in err and "batch size 2" in err and "0.0003" in err
    assert list((tmp_path / "sub").iterdir()) == []


def test_tta_and_classes_of_small_bundle(small):
    bundle = export.load_bundle(small[1], backend="onnxruntime", tta="five-crop")
    assert bundle.classes == TINY_CLASSES and len(bundle.views) == 5


@pytest.fixture
def ensemble_copy(small, bundle_copy, tmp_path) -> Path:
    code, _ = export_cli("ensemble", "--members", small[1], bundle_copy, "--out", tmp_path / "ens")
    assert code == 0
    return tmp_path / "ens"


def _edit_member(ensemble: Path, **changes) -> None:
    """Change members[0]; its manifest_sha256 follows a path that points at another member manifest."""
    from export.manifest import file_sha256

    m = json.loads((ensemble / "manifest.json").read_text())
    m["members"][0].update(changes)
    target = ensemble / str(m["members"][0]["path"]) / "manifest.json"
    if isinstance(m["members"][0]["path"], str) and m["members"][0]["path"].startswith("members/") and target.is_file():
        m["members"][0]["manifest_sha256"] = file_sha256(target)
    (ensemble / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("path", [".", "", "./", "/etc", "../copy", "members/../..", "members\\a"])
def test_an_ensemble_member_path_outside_the_bundle_is_refused(ensemble_copy, path):
    # '.' recursed until RecursionError; absolute and '..' paths read outside the bundle
    _edit_member(ensemble_copy, path=path)
    with pytest.raises(export.BundleError, match="must be a relative folder inside the ensemble bundle") as e:
        export.load_bundle(ensemble_copy)
    assert e.value.category == "path"


def test_a_nested_ensemble_is_refused_by_the_loader_and_the_server(ensemble_copy, tmp_path):
    from server.models import load_served_model

    inner = ensemble_copy / "members" / "nested"
    shutil.copytree(ensemble_copy, tmp_path / "inner")
    shutil.move(tmp_path / "inner", inner)
    _edit_member(ensemble_copy, path="members/nested")
    with pytest.raises(export.BundleError, match="nested ensembles are not supported"):
        export.load_bundle(ensemble_copy)
    with pytest.raises(ValueError, match="nested ensembles are not supported"):   # a Redis front reads manifests only
        load_served_model(ensemble_copy, with_weights=False)


@pytest.mark.parametrize("change, words", [
    ({"artifacts": ["model.ts"]}, r"manifest\.artifacts: \['model.ts'\] is not of type 'object'"),
    ({"preprocessing": [224]}, r"manifest\.preprocessing: \[224\] is not of type 'object'"),
    ({"output": "probs"}, "manifest.output: 'probs' is not of type 'object'"),
])
def test_wrong_value_types_are_a_bundle_error_not_a_crash(bundle_copy, change, words):
    # these raised AttributeError / TypeError before
    _edit_manifest(bundle_copy, **change)
    with pytest.raises(export.BundleError, match=words) as e:
        export.load_bundle(bundle_copy)
    assert e.value.category == "schema"


@pytest.mark.parametrize("members, words", [
    ("members", "manifest.members: 'members' is not of type 'array'"),
    ([["a", "b"]], r"manifest\.members\[0\]: \['a', 'b'\] is not of type 'object'"),
    ([], r"manifest\.members: \[\] should be non-empty"),
])
def test_wrong_member_types_are_a_bundle_error(ensemble_copy, members, words):
    _edit_manifest(ensemble_copy, members=members)
    with pytest.raises(export.BundleError, match=words):
        export.load_bundle(ensemble_copy)


@pytest.mark.parametrize("weight, words", [("heavy", "'heavy' is not of type 'number'"),
                                           (-1, "-1 is less than the minimum of 0"),
                                           (True, "True is not of type 'number'"),
                                           (float("inf"), "weight must be a non-negative number")])
def test_a_member_weight_that_is_not_a_non_negative_number_is_refused(ensemble_copy, weight, words):
    _edit_member(ensemble_copy, weight=weight)
    with pytest.raises(export.BundleError, match=words) as e:
        export.load_bundle(ensemble_copy)
    assert e.value.category == "schema"


@pytest.mark.parametrize("path", [7, None])
def test_a_member_path_that_is_not_a_string_is_a_schema_error(ensemble_copy, path):
    _edit_member(ensemble_copy, path=path)
    with pytest.raises(export.BundleError, match=r"members\[0\]\.path: .* is not of type 'string'"):
        export.load_bundle(ensemble_copy)


def test_a_member_without_manifest_sha256_is_refused_by_the_loader_and_the_server(ensemble_copy):
    # it was optional: a member manifest could be swapped without the ensemble noticing
    from server.models import load_served_model

    m = json.loads((ensemble_copy / "manifest.json").read_text())
    del m["members"][1]["manifest_sha256"]
    (ensemble_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(export.BundleError, match=r"members\[1\]: 'manifest_sha256' is a required property"):
        export.load_bundle(ensemble_copy)
    with pytest.raises(ValueError, match="'manifest_sha256' is a required property"):
        load_served_model(ensemble_copy, with_weights=False)


def test_a_tampered_member_manifest_is_refused_by_the_server_front(ensemble_copy):
    # the Redis front reads member manifests only; it did not compare them with manifest_sha256
    from server.models import load_served_model

    member = ensemble_copy / "members" / json.loads((ensemble_copy / "manifest.json").read_text())["members"][0]["name"]
    m = json.loads((member / "manifest.json").read_text())
    m["tta"]["merge"] = "max"
    (member / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="sha256 differs from the ensemble manifest's"):
        load_served_model(ensemble_copy, with_weights=False)


@pytest.mark.parametrize("name", ["../model.onnx.data", "/etc/passwd", "sub/x.data", ".."])
def test_data_files_must_be_plain_names_in_the_bundle(bundle_copy, name):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["artifacts"]["onnx"]["data_files"] = [name]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(export.BundleError, match="must be a plain file name in the bundle folder") as e:
        export.load_bundle(bundle_copy, backend="torchscript")
    assert e.value.category == "path"


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_a_class_list_that_does_not_match_the_model_output_is_refused_at_load(bundle_copy, backend):
    # classes and output.shape edited together pass the manifest checks; the warm-up call catches it (as in C++)
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["classes"], m["output"]["shape"] = ["0", "1"], [-1, 2]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(export.BundleError, match="lists 2 classes but backend .* outputs 3 scores per image") as e:
        export.load_bundle(bundle_copy, backend=backend)
    assert e.value.category == "classes"
