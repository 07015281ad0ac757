"""A real (briefly trained) digits model exported in every format, int8 included, then used through
the CLI, the loader on every backend, TTA and ensembles."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, run_cli
from export_testlib import export_cli, write_checkpoint

import export
from export.manifest import file_sha256, read_manifest
from export.onnx_metadata import read_onnx_metadata

pytestmark = pytest.mark.slow
BACKENDS = ["onnxruntime", "torchscript", "pt2", "eager"]


@pytest.fixture(scope="module")
def digits_checkpoint(tiny_digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    res = run_cli("train", "--data", str(tiny_digits), "--out", str(out), "--epochs", "2", *FAST_TRAIN)
    assert res.returncode == 0, res.stderr
    return out / "best.pt"


@pytest.fixture(scope="module")
def digits_bundle(digits_checkpoint, tiny_digits, tmp_path_factory) -> Path:
    """Every format plus int8, through the real command line, verified on the validation split; and a
    Triton model of it in the repository next to it (triton/digits-resnet18/)."""
    out = tmp_path_factory.mktemp("bundles") / "digits"
    res = run_cli("--checkpoint", str(digits_checkpoint), "--format", "all", "triton", "--out", str(out), "--data",
                  str(tiny_digits), "--max-batch", "16", "--tta", "hflip", "--quantize", "int8", "--calibration",
                  str(tiny_digits / "train"), "--calibration-method", "percentile",
                  # 24 validation images: one flipped image is 4.2 points, over the default limit of 1
                  "--max-accuracy-drop", "10", "--triton-repo", str(out.parent / "triton"),
                  # no static batch-1 .pt2 (a second AOTInductor compile, 15-25 s): the session bundle_a has it,
                  # tests/native/test_runtime.py runs it
                  "--pt2-static-batches", module="export")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Warning" not in res.stderr, res.stderr  # deprecation chatter is handled, not spammed
    return out


@pytest.fixture(scope="module")
def val_paths(tiny_digits) -> list[str]:
    return sorted(str(p) for p in (tiny_digits / "val").rglob("*.png"))


def _reference_probs(checkpoint, paths) -> np.ndarray:
    """Eager PyTorch with the trainer's own preprocessing: the numbers every backend must reproduce."""
    from trainer.inference import model_from_checkpoint
    from trainer.data import Normalize, decode_image, eval_transform

    loaded = model_from_checkpoint(checkpoint)
    x = torch.stack([eval_transform(decode_image(p), loaded.preprocess) for p in paths])
    with torch.no_grad():
        logits = loaded.model(Normalize(loaded.preprocess.mean, loaded.preprocess.std)(x))
    return torch.softmax(logits, -1).numpy()


def test_manifest_records_every_artifact_and_check(digits_bundle, digits_checkpoint):
    m = read_manifest(digits_bundle)
    assert set(m["artifacts"]) == {"torchscript", "onnx", "pt2", "onnx_int8"}
    for key in ("torchscript", "onnx", "pt2"):
        art = m["artifacts"][key]
        assert art["sha256"] == file_sha256(digits_bundle / art["file"])
        assert art["parity"]["max_abs_diff"] <= 1e-4 and art["parity"]["top1_agree"]
        assert art["parity"]["batch_sizes"] == [1, 2, 5]
        assert art["parity"]["images"].startswith("validation split of")
    assert m["artifacts"]["pt2"]["static_batch_models"] == {}  # --pt2-static-batches with no size: none
    for key in ("torchscript", "pt2"):  # compiled for the CPU, and the manifest says so
        assert (m["artifacts"][key]["device"], m["artifacts"][key]["precision"]) == ("cpu", "fp32")
    assert "device" not in m["artifacts"]["onnx"] and "parity_cuda" not in m["artifacts"]["onnx"]  # device-neutral
    onnx = m["artifacts"]["onnx"]
    for name in onnx.get("data_files", []):
        assert onnx["data_sha256"][name] == file_sha256(digits_bundle / name)
    assert m["provenance"]["checkpoint_sha256"] == file_sha256(digits_checkpoint)
    assert m["input"] == {"name": "images", "dtype": "uint8", "shape": [-1, 3, 32, 32]}
    assert m["output"]["shape"] == [-1, 3] and m["classes"] == ["0", "1", "7"]
    assert m["tta"]["views"] == [{"resize": None, "crop": "center", "flip": f} for f in ("none", "h")]
    assert not [p for p in digits_bundle.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_torchscript_carries_its_manifest(digits_bundle):
    extra = {"manifest.json": ""}
    with pytest.warns(FutureWarning):  # torch.jit.load is deprecated, still what C++ loads
        torch.jit.load(str(digits_bundle / "model.ts"), _extra_files=extra)
    embedded = json.loads(extra["manifest.json"])
    m = read_manifest(digits_bundle)
    assert embedded["classes"] == m["classes"] and embedded["preprocessing"] == m["preprocessing"]


def test_every_backend_matches_eager_on_real_images(digits_bundle, digits_checkpoint, val_paths):
    ref = _reference_probs(digits_checkpoint, val_paths)
    for backend in BACKENDS:
        bundle = export.load_bundle(digits_bundle, backend=backend, tta="none", threads=2)
        result = bundle.predict(val_paths, topk=2)
        assert result.probs.shape == (len(val_paths), 3)
        np.testing.assert_allclose(result.probs, ref, atol=1e-4, rtol=0, err_msg=backend)
        assert (result.indices[:, 0] == ref.argmax(1)).all()
        assert (result.scores[:, 0] >= result.scores[:, 1]).all()
    auto = export.load_bundle(digits_bundle)
    assert auto.backend == "onnxruntime"


def test_predict_accepts_paths_bytes_and_arrays(digits_bundle, val_paths):
    from trainer.data import decode_image

    bundle = export.load_bundle(digits_bundle, backend="onnxruntime", tta="none")
    paths = val_paths[:3]
    by_path = bundle.predict(paths).probs
    by_bytes = bundle.predict([Path(p).read_bytes() for p in paths]).probs
    by_array = bundle.predict([decode_image(p) for p in paths]).probs
    np.testing.assert_array_equal(by_path, by_bytes)
    np.testing.assert_array_equal(by_path, by_array)
    assert bundle.predict(paths[0]).labels[0][0] == bundle.classes[int(by_path[0].argmax())]


def test_default_tta_is_the_manifest_policy(digits_bundle, val_paths):
    from trainer.data import decode_image, eval_transform

    bundle = export.load_bundle(digits_bundle, backend="torchscript")  # manifest default: hflip
    x = torch.stack([eval_transform(decode_image(p), bundle.spec) for p in val_paths[:4]])
    expected = (bundle.predict_tensor(x) + bundle.predict_tensor(x.flip(-1))) / 2
    np.testing.assert_allclose(bundle.predict(val_paths[:4]).probs, expected, atol=1e-6)


def test_predict_tensor_chunks_by_max_batch_and_checks_input(bundle_a):
    bundle = export.load_bundle(bundle_a, backend="pt2")   # the session bundle: it has the static batch-1 model
    assert bundle.manifest["artifacts"]["pt2"]["static_batch_models"] == {"1": "batch1"}
    x = torch.randint(0, 256, (37, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    whole = bundle.predict_tensor(x)  # 37 > max_batch 8: five calls
    singles = np.concatenate([bundle.predict_tensor(x[i:i + 1]) for i in range(37)])  # the static batch-1 model
    np.testing.assert_allclose(whole, singles, atol=1e-5)
    with pytest.raises(export.BundleError, match="uint8"):
        bundle.predict_tensor(x.float())


def test_int8_records_accuracy_before_and_after(digits_bundle, val_paths):
    q = read_manifest(digits_bundle)["artifacts"]["onnx_int8"]["quantization"]
    assert q["calibration_images"] == 72 and q["validation_images"] == 24
    assert q["calibrate_method"] == "Percentile" and q["keep_float"] == "softmax+head" and q["max_accuracy_drop"] == 10
    assert q["top1_drop"] == pytest.approx(100 * (q["correct_fp32"] - q["correct_int8"]) / 24)
    assert q["top1_drop"] <= 10 and q["correct_int8"] == round(24 * q["top1_int8"])
    labels = np.array([["0", "1", "7"].index(Path(p).parent.name) for p in val_paths])
    for backend, key in (("onnxruntime-int8", "top1_int8"), ("eager", "top1_fp32")):
        probs = export.load_bundle(digits_bundle, backend=backend, tta="none").predict(val_paths).probs
        assert q[key] == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-9), backend


def test_inspect_and_verify_commands(digits_bundle, tiny_digits, capsys):
    code, _ = export_cli("inspect", digits_bundle, capsys=None)
    out = capsys.readouterr().out
    assert code == 0 and "onnx_int8" in out and "int8 top-1" in out
    code, err = export_cli("verify", digits_bundle, "--data", tiny_digits, capsys=capsys)
    assert code == 0, err


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory, tiny_digits) -> Path:
    root = tmp_path_factory.mktemp("second")
    ckpt = write_checkpoint(root / "mnv3.pt", "mobilenet_v3_small", seed=3)
    from export.build import ExportOptions, build_bundle

    out, _ = build_bundle(ExportOptions(str(ckpt), str(root / "mnv3"), ["onnx"], max_batch=8,
                                        data=str(tiny_digits)), say=lambda *_: None)
    return out


@pytest.mark.parametrize("fusion,weights", [("mean", None), ("weighted", [3.0, 1.0]), ("vote", [1.0, 2.0])])
def test_ensemble_fuses_member_probabilities(digits_bundle, second_bundle, val_paths, tmp_path, fusion, weights):
    args = ["ensemble", "--members", digits_bundle, second_bundle, "--fusion", fusion, "--out", tmp_path / "ens"]
    code, err = export_cli(*args, *(["--weights", *map(str, weights)] if weights else []))
    assert code == 0, err
    ens = export.load_bundle(tmp_path / "ens", backend="onnxruntime", tta="none")
    a = export.load_bundle(digits_bundle, backend="onnxruntime", tta="none").predict(val_paths).probs
    b = export.load_bundle(second_bundle, backend="onnxruntime", tta="none").predict(val_paths).probs
    w = np.array(weights or [1.0, 1.0]) / sum(weights or [1.0, 1.0])
    if fusion == "vote":
        expected = w[0] * np.eye(3)[a.argmax(1)] + w[1] * np.eye(3)[b.argmax(1)]
    else:
        expected = w[0] * a + w[1] * b
    np.testing.assert_allclose(ens.predict(val_paths).probs, expected, atol=1e-6)
    assert ens.classes == ["0", "1", "7"]
    if fusion == "mean":  # re-checks both members' checksums and parity: once is enough
        assert export_cli("verify", tmp_path / "ens")[0] == 0


# -- metadata where other tools look: ONNX metadata_props, a Triton model repository -------------------
def test_onnx_files_carry_the_manifest_identity(digits_bundle):
    import onnx
    import onnxruntime as ort

    m = read_manifest(digits_bundle)
    for key in ("onnx", "onnx_int8"):
        path = digits_bundle / m["artifacts"][key]["file"]
        assert file_sha256(path) == m["artifacts"][key]["sha256"]  # written before hashing
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        meta = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
        for found in (props, meta):
            assert json.loads(found["classes"]) == m["classes"], key
            assert json.loads(found["preprocessing"]) == m["preprocessing"], key
            assert (found["name"], found["version"], found["architecture"]) == (m["name"], m["version"],
                                                                                 m["architecture"]), key
            assert found["bundle_schema_version"] == str(m["schema_version"]), key
        assert read_onnx_metadata(path)["classes"] == m["classes"]


def _triton_config(model_dir: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return mc, text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def _check_triton_model(model_dir: Path, bundle: Path, key: str, paths: list[str]) -> None:
    """labels.txt and 1/model.onnx of a Triton model agree with the bundle (probabilities on real images)."""
    import onnxruntime as ort
    from trainer.data import decode_image, eval_transform
    from export.manifest import preprocess_spec

    m = read_manifest(bundle)
    assert (model_dir / "labels.txt").read_text().splitlines() == m["classes"]
    art = m["artifacts"][key]
    assert file_sha256(model_dir / "1" / "model.onnx") == art["sha256"]
    for name in art.get("data_files", []):
        assert file_sha256(model_dir / "1" / name) == art["data_sha256"][name]
    # what a client does: preprocess as the copied manifest says, send uint8 (N, 3, H, W)
    spec = preprocess_spec(read_manifest(model_dir / "manifest.json"))
    x = torch.stack([eval_transform(decode_image(p), spec) for p in paths])
    got = ort.InferenceSession(str(model_dir / "1" / "model.onnx")).run(["probs"], {"images": x.numpy()})[0]
    backend = "onnxruntime-int8" if key == "onnx_int8" else "onnxruntime"
    want = export.load_bundle(bundle, backend=backend, tta="none").predict(paths).probs
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_format_triton_writes_a_model_repository(digits_bundle, val_paths):
    m = read_manifest(digits_bundle)
    model_dir = digits_bundle.parent / "triton" / m["name"]
    mc, cfg = _triton_config(model_dir)
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == (m["name"], "onnxruntime_onnx", 16)
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest" and cfg.version_policy.latest.num_versions == 1
    [inp], [out] = cfg.input, cfg.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("images", mc.TYPE_UINT8, [3, 32, 32])
    assert (out.name, out.data_type, list(out.dims), out.label_filename) == ("probs", mc.TYPE_FP32, [3], "labels.txt")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    [group] = cfg.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_CPU, 1, [])
    [warmup] = cfg.model_warmup
    assert warmup.batch_size == 1 and list(warmup.inputs["images"].dims) == [3, 32, 32]
    assert warmup.inputs["images"].zero_data and warmup.inputs["images"].data_type == mc.TYPE_UINT8
    assert not cfg.parameters
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [m["name"]]  # no temporary folder left
    _check_triton_model(model_dir, digits_bundle, "onnx", val_paths)


def test_triton_command_options_int8_gpu(digits_bundle, val_paths, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, err = export_cli("triton", digits_bundle, "--out", repo, "--name", "digits_int8", "--int8", "--device",
                           "cuda:1", "--instances", "2", "--preferred-batch-sizes", "8", "2", "--max-queue-delay-us",
                           "500", "--threads", "3", capsys=capsys)
    assert code == 0, err
    mc, cfg = _triton_config(repo / "digits_int8")
    assert cfg.name == "digits_int8" and list(cfg.dynamic_batching.preferred_batch_size) == [2, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    [group] = cfg.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 2, [1])
    assert cfg.parameters["intra_op_thread_count"].string_value == "3"
    _check_triton_model(repo / "digits_int8", digits_bundle, "onnx_int8", val_paths[:6])
    # plain cuda: every GPU (no gpus list); no preferred sizes when none are given
    code, err = export_cli("triton", digits_bundle, "--out", repo, "--device", "cuda", "--preferred-batch-sizes",
                           capsys=capsys)
    assert code == 0, err
    mc, cfg = _triton_config(repo / read_manifest(digits_bundle)["name"])
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and not cfg.instance_group[0].gpus
    assert not cfg.dynamic_batching.preferred_batch_size and cfg.HasField("dynamic_batching")


@pytest.mark.parametrize("args,words", [
    (["--name", "a/b"], "Triton model name 'a/b'"),
    (["--preferred-batch-sizes", "17"], "--preferred-batch-sizes [17]: each must be between 1 and the bundle's "
                                        "max_batch 16"),
    (["--instances", "0"], "--instances must be at least 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["ENSEMBLE"], "is an ensemble bundle; a Triton repository serves single ONNX models"),
])
def test_triton_refusals(digits_bundle, second_bundle, tmp_path, capsys, args, words):
    bundle = digits_bundle
    if args == ["ENSEMBLE"]:
        bundle = tmp_path / "ens"
        assert export_cli("ensemble", "--members", second_bundle, second_bundle, "--out", bundle)[0] == 0
    code, err = export_cli("triton", bundle, "--out", tmp_path / "repo", *(a for a in args if a != "ENSEMBLE"),
                           capsys=capsys)
    assert code == 2 and words in err, err
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_triton_replaces_only_with_force_and_checks_the_copied_bytes(digits_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export_cli("triton", digits_bundle, "--out", repo, "--name", "d")[0] == 0
    code, err = export_cli("triton", digits_bundle, "--out", repo, "--name", "d", capsys=capsys)
    assert code == 2 and "already exists in the repository; pass --force" in err
    (repo / "d" / "labels.txt").write_text("stale\n")
    assert export_cli("triton", digits_bundle, "--out", repo, "--name", "d", "--force")[0] == 0
    assert (repo / "d" / "labels.txt").read_text().split() == ["0", "1", "7"]
    (repo / "other").mkdir()  # not a Triton model: never replaced
    code, err = export_cli("triton", digits_bundle, "--out", repo, "--name", "other", "--force", capsys=capsys)
    assert code == 2 and "is not a Triton model folder" in err
    # a bundle whose model.onnx changed after export: refused, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    m = read_manifest(digits_bundle)
    for name in ["manifest.json", *(f for f in os.listdir(digits_bundle) if f.startswith("model.onnx"))]:
        shutil.copy(digits_bundle / name, bad / name)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    code, err = export_cli("triton", bad, "--out", repo, "--name", "bad", capsys=capsys)
    assert code == 2 and "sha256" in err and m["artifacts"]["onnx"]["sha256"][:16] in err
    assert not (repo / "bad").exists() and not [p for p in repo.iterdir() if p.name.startswith(".")]


def test_format_triton_flags_are_checked_before_the_export(tmp_path, capsys):
    code, err = export_cli("--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "b", "--format", "triton",
                           capsys=capsys)
    assert code == 2 and "--format triton needs --triton-repo REPO" in err
    code, err = export_cli("--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "b", "--triton-repo",
                           tmp_path / "r", capsys=capsys)
    assert code == 2 and "--triton-repo is only used with --format triton" in err
    (tmp_path / "r" / "taken").mkdir(parents=True)
    code, err = export_cli("--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "b", "--format", "triton",
                           "--triton-repo", tmp_path / "r", "--name", "taken", capsys=capsys)
    assert code == 2 and "already exists in the repository" in err  # not the missing checkpoint: checked first


def test_a_manifest_edited_after_export_disagrees_with_the_onnx_metadata(second_bundle, tmp_path, capsys):
    bundle = tmp_path / "edited"
    shutil.copytree(second_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["classes"] = ["0", "1", "seven"]  # sha256 of the artifacts still match: only the metadata can tell
    (bundle / "manifest.json").write_text(json.dumps(m))
    code, err = export_cli("verify", bundle, capsys=capsys)
    assert code == 2 and "metadata ['classes'] differ" in err and "edited after export" in err, err
    code, err = export_cli("triton", bundle, "--out", tmp_path / "repo", capsys=capsys)
    assert code == 2 and "metadata ['classes'] differ" in err, err
    assert not (tmp_path / "repo" / m["name"]).exists()
