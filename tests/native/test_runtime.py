"""The C++ Runtime (through classify_native) against the Python bundle loader, on bundles written
by the export package: single model (.pt2 and TorchScript), TTA, ensembles, errors.

    pytest -q tests/native/test_runtime.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export import load_bundle
from trainer.data.images import decode_image

pytestmark = pytest.mark.slow  # trains two tiny models and compiles a .pt2 once per session

TOL = 1e-4


def native_probs(rt, paths) -> np.ndarray:
    results = rt.predict_files(paths)
    assert all(r["error"] is None for r in results), [r["error"] for r in results if r["error"]]
    return np.stack([r["probs"] for r in results])


@pytest.mark.parametrize("fmt,tta", [("pt2", None), ("torchscript", "none"), ("pt2", "ten-crop"),
                                     ("torchscript", "multiscale:36,44")])
def test_single_model_matches_python(native, bundle_a, eval_images, fmt, tta):
    ref = load_bundle(bundle_a, backend=fmt, tta=tta, threads=1).predict(eval_images, topk=3)
    rt = native.Runtime(str(bundle_a), format=fmt, tta=tta, threads=1, batch=4)
    assert rt.format == fmt and rt.classes == ref.classes
    got = native_probs(rt, eval_images)
    assert np.abs(got - ref.probs).max() <= TOL
    tops = [[t["index"] for t in r["topk"]] for r in rt.predict_files(eval_images, topk=3)]
    assert tops == np.argsort(-got, axis=1, kind="stable")[:, :3].tolist()
    clear = np.diff(-np.sort(-ref.probs, axis=1)[:, :2], axis=1)[:, 0] < -2 * TOL  # top-1 not a near tie
    assert [t[0] for t, c in zip(tops, clear) if c] == [i[0] for i, c in zip(ref.indices.tolist(), clear) if c]


def test_default_tta_comes_from_the_manifest(native, bundle_a):
    rt = native.Runtime(str(bundle_a))
    manifest = json.loads((bundle_a / "manifest.json").read_text())
    assert rt.views == manifest["tta"]["views"] and len(rt.views) == 2  # exported with --tta hflip
    assert rt.format == "pt2"  # .pt2 preferred when present


@pytest.mark.parametrize("fusion", ["weighted", "vote", "mean"])
def test_ensemble_matches_python(native, ensembles, eval_images, fusion):
    ref = load_bundle(ensembles[fusion], backend="torchscript", threads=1).predict(eval_images)
    rt = native.Runtime(str(ensembles[fusion]), format="torchscript", threads=1)
    assert rt.kind == "ensemble"
    got = native_probs(rt, eval_images)
    assert np.abs(got - ref.probs).max() <= TOL
    if fusion == "vote":  # weights 1:2 -> weighted vote fractions in {0, 1/3, 2/3, 1}
        assert np.allclose(got * 3, np.round(got * 3), atol=1e-5) and np.allclose(got.sum(1), 1.0)


def test_bytes_array_and_files_agree(native, bundle_a, eval_images):
    rt = native.Runtime(str(bundle_a), tta="none", threads=1)
    by_file = native_probs(rt, eval_images)
    blobs = [open(p, "rb").read() for p in eval_images]
    by_bytes = np.stack([r["probs"] for r in rt.predict_bytes(blobs)])
    assert np.array_equal(by_file, by_bytes)
    same_size = [p for p in eval_images if decode_image(p).shape == decode_image(eval_images[0]).shape]
    arr = np.stack([decode_image(p) for p in same_size])  # (N, H, W, 3)
    by_array = np.stack([r["probs"] for r in rt.predict_array(arr)])
    # the same pixels (decoding is compared exactly above and in test_preprocess.py), but a batch of
    # len(same_size) rows instead of all of them: the convolution kernels may block the rows differently,
    # which moves probabilities by ~1e-11 here; anything near TOL would be a real difference
    assert np.abs(by_array - by_file[:len(same_size)]).max() <= 1e-7


def test_one_bad_image_does_not_spoil_the_batch(native, bundle_a, eval_images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(open(eval_images[9], "rb").read()[:200])
    paths = eval_images[:3] + [str(bad), str(tmp_path / "missing.png")] + eval_images[3:5]
    rt = native.Runtime(str(bundle_a), batch=3)
    results = rt.predict_files(paths)
    assert [r["error"] is None for r in results] == [True] * 3 + [False, False] + [True] * 2
    assert "broken.jpg" in results[3]["error"] and "missing.png: cannot open" in results[4]["error"]
    clean = native_probs(rt, eval_images[:5])
    assert np.array_equal(np.stack([r["probs"] for i, r in enumerate(results) if i not in (3, 4)]), clean)


def test_native_backend_in_python_loader(native, bundle_a, eval_images):
    ref = load_bundle(bundle_a, backend="pt2", tta="none").predict(eval_images)
    got = load_bundle(bundle_a, backend="native", tta="none").predict(eval_images)
    assert np.abs(got.probs - ref.probs).max() <= TOL


def test_bundle_refusals_name_file_and_fix(native, bundle_a, bundle_b, tmp_path):
    with pytest.raises(native.BundleError, match="not a bundle.*python -m export"):
        native.Runtime(str(tmp_path / "nowhere"))
    bad = tmp_path / "tampered"
    shutil.copytree(bundle_a, bad)
    with open(bad / "model.pt2", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(native.BundleError, match=r"model.pt2: sha256 .* differs .* re-export"):
        native.Runtime(str(bad))
    native.Runtime(str(bad), format="torchscript")  # the untouched artifact still loads
    m = json.loads((bad / "manifest.json").read_text())
    m["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(native.BundleError, match="unknown schema_version 99"):
        native.Runtime(str(bad), format="torchscript")
    with pytest.raises(native.BundleError, match="has no 'pt2' artifact"):
        native.Runtime(str(bundle_b), format="pt2")
    with pytest.raises(native.OptionError, match="unknown TTA policy"):
        native.Runtime(str(bundle_a), tta="sideways")
    with pytest.raises(native.OptionError, match="smaller than the 32x32 crop"):
        native.Runtime(str(bundle_a), tta="multiscale:20")


def test_pt2_static_batch1_model_is_used_and_matches(native, bundle_a, eval_images, tmp_path):
    """The .pt2 holds a batch-1 model (prepacked weights) besides the dynamic one: batch 1 goes to it,
    larger batches to the dynamic model, and both agree with the Python loader."""
    art = json.loads((bundle_a / "manifest.json").read_text())["artifacts"]["pt2"]
    assert art["static_batch_models"] == {"1": "batch1"}
    ref = load_bundle(bundle_a, backend="pt2", tta="none", threads=1).predict(eval_images)
    for batch in (1, 3):
        got = native_probs(native.Runtime(str(bundle_a), format="pt2", tta="none", threads=1, batch=batch), eval_images)
        assert np.abs(got - ref.probs).max() <= TOL
    # a manifest naming a model the package lacks is refused with the model's name
    bad = tmp_path / "renamed"
    shutil.copytree(bundle_a, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["artifacts"]["pt2"]["static_batch_models"] = {"1": "batch9"}
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(native.BundleError, match="cannot load model 'batch9'"):
        native.Runtime(str(bad), format="pt2")
    m["artifacts"]["pt2"]["static_batch_models"] = {"one": "batch1"}
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(native.BundleError, match="static_batch_models key 'one' is not a batch size"):
        native.Runtime(str(bad), format="pt2")


# Run in a child process: if the call held the GIL, the parent's writer below could never run and the
# child would hang (its timeout turns that into a failure instead of a stuck suite).
_GIL_CHILD = r"""
import os, sys, threading
import classify_native

bundle, fifo, image = sys.argv[1:4]
rt = classify_native.Runtime(bundle, format="torchscript", tta="ten-crop", threads=1)
out = []
reader = threading.Thread(target=lambda: out.extend(rt.predict_files([fifo])))
reader.start()
# open() of a FIFO for writing blocks until the reader has opened it, which the C++ decoder does inside
# predict_files: this line runs only while the native call is in progress and the GIL is free
fd = os.open(fifo, os.O_WRONLY)
assert reader.is_alive(), "predict_files returned before its input was written"
with open(image, "rb") as fh:
    os.write(fd, fh.read())
os.close(fd)
reader.join()
assert out[0]["error"] is None, out[0]["error"]
print("probs", " ".join(f"{p:.6f}" for p in out[0]["probs"]))
"""


def test_gil_is_released_during_inference(native, bundle_a, eval_images, tmp_path):
    """While C++ reads, decodes and runs the model, another Python thread runs: the child blocks the native
    call on a FIFO that only another Python thread can feed, so the call finishes only if the GIL is free
    (no timing, no tick counting)."""
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-c", _GIL_CHILD, str(bundle_a), str(fifo), eval_images[0]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.array([float(v) for v in proc.stdout.split("probs", 1)[1].split()])
    ref = native.Runtime(str(bundle_a), format="torchscript", tta="ten-crop", threads=1).predict_files(eval_images[:1])
    assert np.abs(got - ref[0]["probs"]).max() <= 1e-5  # the image written into the FIFO is the one classified


@pytest.mark.parametrize("merge", ["max", "vote"])
def test_tta_merge_rules_match_python(native, bundle_a, eval_images, tmp_path, merge):
    copy = tmp_path / "b"
    shutil.copytree(bundle_a, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["tta"]["merge"] = merge
    (copy / "manifest.json").write_text(json.dumps(m))
    ref = load_bundle(copy, backend="torchscript", tta="five-crop").predict(eval_images[:6])
    rt = native.Runtime(str(copy), format="torchscript", tta="five-crop", threads=1)
    assert rt.merge == merge
    assert np.abs(native_probs(rt, eval_images[:6]) - ref.probs).max() <= TOL


def _ensemble_with_member(ensembles, tmp_path, **changes) -> Path:
    ens = tmp_path / "ens"
    shutil.copytree(ensembles["mean"], ens)
    m = json.loads((ens / "manifest.json").read_text())
    m["members"][0].update(changes)
    (ens / "manifest.json").write_text(json.dumps(m))
    return ens


# the same refusals as the Python loader (tests/export/test_refusals.py): '.' overflowed the stack
@pytest.mark.parametrize("path", [".", "", "/etc", "../x", "members/../..", "members\\a"])
def test_an_ensemble_member_path_outside_the_bundle_is_refused(native, ensembles, tmp_path, path):
    ens = _ensemble_with_member(ensembles, tmp_path, path=path)
    with pytest.raises(native.BundleError, match="relative folder inside the ensemble bundle"):
        native.Runtime(str(ens), threads=1)


def test_a_nested_ensemble_is_refused(native, ensembles, tmp_path):
    from export.manifest import file_sha256

    nested = tmp_path / "nested"
    shutil.copytree(ensembles["vote"], nested)
    ens = _ensemble_with_member(ensembles, tmp_path, path="members/nested",
                                manifest_sha256=file_sha256(nested / "manifest.json"))
    shutil.move(nested, ens / "members" / "nested")
    with pytest.raises(native.BundleError, match="nested ensembles are not supported"):
        native.Runtime(str(ens), threads=1)


@pytest.mark.parametrize("weight", ["heavy", -1, True])
def test_a_member_weight_that_is_not_a_non_negative_number_is_refused(native, ensembles, tmp_path, weight):
    ens = _ensemble_with_member(ensembles, tmp_path, weight=weight)
    with pytest.raises(native.BundleError, match="weight"):
        native.Runtime(str(ens), threads=1)
