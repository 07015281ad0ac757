"""The classify binary as a subprocess: output format, exit codes, per-image errors, refusals.

    pytest -q tests/native/test_classify_cli.py
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from export import load_bundle

pytestmark = pytest.mark.slow  # shares the trained/exported bundles with test_runtime.py


def classify(bin_path, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_path), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def lines(res) -> list[dict]:
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def test_good_images_print_one_json_line_each(classify_bin, bundle_a, eval_images):
    res = classify(classify_bin, "--bundle", bundle_a, "--topk", 2, "--batch", 5, "--threads", 1, *eval_images)
    assert res.returncode == 0, res.stderr
    out = lines(res)
    assert [o["path"] for o in out] == eval_images
    assert list(out[0]) == ["path", "topk", "error"] and all(o["error"] is None for o in out)
    ref = load_bundle(bundle_a, backend="pt2").predict(eval_images, topk=2)  # manifest default TTA (hflip)
    classes = ref.classes
    for o, probs in zip(out, ref.probs):
        assert len(o["topk"]) == 2 and o["topk"][0]["prob"] >= o["topk"][1]["prob"]
        for t in o["topk"]:
            assert t["label"] == classes[t["index"]] and abs(t["prob"] - probs[t["index"]]) <= 1e-4


def test_corrupt_image_among_good_ones_exits_1(classify_bin, bundle_a, eval_images, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    paths = [eval_images[0], str(bad), eval_images[1]]
    res = classify(classify_bin, "--bundle", bundle_a, "--format", "torchscript", "--tta", "ten-crop", "--threads", 1, *paths)
    assert res.returncode == 1
    out = lines(res)
    assert [o["error"] is None for o in out] == [True, False, True]
    assert "corrupt.png" in out[1]["error"] and out[1]["topk"] == []
    assert "1 of 3 images failed" in res.stderr
    ref = load_bundle(bundle_a, backend="torchscript", tta="ten-crop").predict([paths[0], paths[2]], topk=1)
    assert [o["topk"][0]["index"] for o in (out[0], out[2])] == ref.indices[:, 0].tolist()


def test_missing_and_tampered_bundles_exit_2(classify_bin, bundle_a, eval_images, tmp_path):
    res = classify(classify_bin, "--bundle", tmp_path / "none", eval_images[0])
    assert res.returncode == 2 and "is not a bundle" in res.stderr and "python -m export" in res.stderr
    bad = tmp_path / "bad"
    shutil.copytree(bundle_a, bad)
    with open(bad / "model.ts", "ab") as fh:
        fh.write(b"extra")
    res = classify(classify_bin, "--bundle", bad, "--format", "torchscript", eval_images[0])
    assert res.returncode == 2 and "model.ts: sha256" in res.stderr and "modified or corrupted" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["--topk", "x"], "--topk needs an integer"),
    (["--format", "onnx"], "--format must be pt2 or torchscript"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--tta", "sideways"], "unknown TTA policy"),
    (["--device", "tpu"], "unknown device"),
    (["--batch"], "--batch needs a value"),
])
def test_wrong_flags_exit_2(classify_bin, bundle_a, eval_images, args, message):
    res = classify(classify_bin, "--bundle", bundle_a, eval_images[0], *args)  # flags after the image work too
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_no_images_and_help(classify_bin, bundle_a):
    res = classify(classify_bin, "--bundle", bundle_a)
    assert res.returncode == 2 and "no images given" in res.stderr
    res = classify(classify_bin, "--help")
    assert res.returncode == 0 and "--bundle DIR" in res.stdout and "exit status" in res.stdout


def test_bench_prints_percentiles(classify_bin, bundle_a):
    res = classify(classify_bin, "--bundle", bundle_a, "--bench", 3, "--batch", 2, "--threads", 1)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["batch"] == 2 and out["iterations"] == 3 and out["format"] == "pt2"
    for key in ("end_to_end_ms", "model_ms"):
        assert 0 < out[key]["min"] <= out[key]["p50"] <= out[key]["p90"] <= out[key]["p99"]
    assert np.isfinite(out["end_to_end_ms"]["mean"])


def test_bench_runs_inside_the_error_handling(classify_bin, ensembles, bundle_a, eval_images, tmp_path):
    # An ensemble of different input sizes has no single preprocessed batch: the old --bench threw
    # outside any handler and aborted; now model-only timing is null and end to end still runs.
    res = classify(classify_bin, "--bundle", ensembles["mean"], "--bench", 1, "--batch", 2, "--threads", 1)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["model_ms"] is None and out["end_to_end_ms"]["min"] > 0
    for args, message in [(("--bundle", tmp_path / "nowhere", "--bench", 1), "is not a bundle"),
                          (("--bundle", bundle_a, "--bench", 1, eval_images[0]), "--bench .* takes no images"),
                          (("--bundle", bundle_a, "--bench", 1, "--tta", "multiscale:20"), "smaller than the")]:
        res = classify(classify_bin, *args)
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert re.search(f"^classify: error: .*{message}", res.stderr), res.stderr


def test_ensemble_bundle_from_the_command_line(classify_bin, ensembles, eval_images):
    res = classify(classify_bin, "--bundle", ensembles["weighted"], "--topk", 1, "--threads", 1, *eval_images[:6])
    assert res.returncode == 0, res.stderr
    ref = load_bundle(ensembles["weighted"], backend="torchscript").predict(eval_images[:6], topk=1)
    for o, probs in zip(lines(res), ref.probs):
        assert abs(o["topk"][0]["prob"] - probs.max()) <= 1e-4
