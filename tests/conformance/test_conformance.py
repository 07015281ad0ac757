"""Every bundle, image and array case through the three readers: the Python loader
(export.load_bundle), the pybind11 module (classify_native) and the classify binary.

    PYTHONPATH=$PWD/python:$PWD .venv/bin/python -m pytest tests/conformance -q

For each case all three give the same verdict as the case expects: accepted, or refused with the
expected error category (docs/BUNDLE.md "Error categories"); accepted bundles give the same top-1 and
probabilities within 1e-4 on every image. All readers run the case's artifact (TorchScript, or the
.pt2 for the .pt2 cases) on one thread, with the case's trusted keys and --require-signature.
"""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

import export

from .bundle_cases import ENSEMBLE_CASES, MODEL_CASES, PT2_CASES, SIGNATURE_CASES
from .image_cases import ARRAY_CASES, LARGE_IMAGE_CASES

TOL = 1e-4
CASES = [name for name, _, _ in MODEL_CASES + ENSEMBLE_CASES + PT2_CASES] + [c[0] for c in SIGNATURE_CASES]
_PREFIX = re.compile(r"^\[([a-z]+)\] ")


def python_category(exc: Exception) -> str:
    if isinstance(exc, export.BundleError):
        return exc.category
    if type(exc).__name__ == "ImageDecodeError":
        return "image"
    return f"unexpected {type(exc).__name__}: {exc}"


def native_category(message: str) -> str:
    m = _PREFIX.match(message)
    return m.group(1) if m else f"no category in: {message}"


# ---- the three readers: each returns (category or None, {image: probs or category}) -------------
def run_python(case, images, bad):
    try:
        bundle = export.load_bundle(case.path, backend=case.format, threads=1, trusted_keys=case.trusted_keys,
                                    require_signature=case.require_signature)
    except Exception as exc:  # noqa: BLE001 - the category is the verdict
        return python_category(exc), {}
    out = dict(zip(images, bundle.predict(images, topk=1).probs))
    for img in bad:
        try:
            bundle.predict([img])
            out[img] = None
        except Exception as exc:  # noqa: BLE001
            out[img] = python_category(exc)
    return None, out


def run_native(native, case, images, bad):
    try:
        rt = native.Runtime(str(case.path), format=case.format, threads=1,
                            trusted_keys=[str(k) for k in case.trusted_keys], require_signature=case.require_signature)
    except native.NativeError as exc:
        return native_category(str(exc)), {}
    results = rt.predict_files([str(p) for p in [*images, *bad]], topk=1)
    return None, {p: (r["probs"] if r["error"] is None else native_category(r["error"]))
                  for p, r in zip([*images, *bad], results)}


def run_cli(binary, case, images, bad):
    trust = [a for k in case.trusted_keys for a in ("--trusted-key", str(k))]
    trust += ["--require-signature"] if case.require_signature else []
    proc = subprocess.run([str(binary), "--bundle", str(case.path), "--format", case.format, "--threads", "1",
                           *trust, "--topk", "1000", *map(str, [*images, *bad])], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode == 2:
        return native_category(proc.stderr.strip().removeprefix("classify: error: ")), {}
    assert proc.returncode in (0, 1), proc.stderr
    out = {}
    for p, line in zip([*images, *bad], proc.stdout.splitlines()):
        row = json.loads(line)
        assert row["path"] == str(p)
        if row["error"] is not None:
            out[p] = native_category(row["error"])
        else:
            probs = np.zeros(len(row["topk"]), np.float32)
            for t in row["topk"]:
                probs[t["index"]] = t["prob"]
            out[p] = probs
    return None, out


@pytest.mark.parametrize("name", CASES)
def test_bundle_case(name, bundle_cases, image_files, native, classify_bin):
    case = bundle_cases[name]
    good, bad = image_files
    verdicts = {"python": run_python(case, good, bad), "native": run_native(native, case, good, bad),
                "cli": run_cli(classify_bin, case, good, bad)}
    for reader, (category, _) in verdicts.items():
        assert category == case.category, f"{reader} on {name}: expected {case.category}, got {category}"
    if case.category is not None:
        return
    ref = verdicts["python"][1]
    for reader in ("native", "cli"):
        got = verdicts[reader][1]
        for img in bad:
            assert got[img] == bad[img], f"{reader} on {img.name}: expected {bad[img]}, got {got[img]}"
            assert ref[img] == bad[img], f"python on {img.name}: expected {bad[img]}, got {ref[img]}"
        for img in good:
            assert isinstance(got[img], np.ndarray), f"{reader} refused {img.name}: {got[img]}"
            diff = np.abs(got[img] - ref[img]).max()
            assert diff <= TOL, f"{reader} on {img.name}: max abs difference {diff:.2g} from Python"
            top2 = np.sort(ref[img])[-2:]
            if top2[1] - top2[0] > 2 * TOL:  # a near-tie may break either way within the tolerance
                assert got[img].argmax() == ref[img].argmax(), f"{reader} on {img.name}: another top-1"


@pytest.mark.parametrize("name, write", LARGE_IMAGE_CASES, ids=[c[0] for c in LARGE_IMAGE_CASES])
def test_large_image_case(name, write, bundle_cases, native, classify_bin, tmp_path):
    """A large image through the three readers with the plain model bundle: same probabilities."""
    path = tmp_path / name
    write(path)
    case = bundle_cases["model"]
    ref = run_python(case, [path], {})[1][path]
    for reader, (_, got) in (("native", run_native(native, case, [path], {})),
                             ("cli", run_cli(classify_bin, case, [path], {}))):
        assert isinstance(got[path], np.ndarray), f"{reader} refused {name}: {got[path]}"
        assert np.abs(got[path] - ref).max() <= TOL, f"{reader} on {name}: differs from Python"


@pytest.mark.parametrize("name, make_array, category", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_array_case(name, make_array, category, bundle_cases, native):
    """Decoded pixels go to the two readers that take arrays (the CLI takes files only)."""
    path = bundle_cases["model"].path
    array = make_array()
    try:
        ref, py_category = export.load_bundle(path, backend="torchscript", threads=1).predict([array]).probs[0], None
    except Exception as exc:  # noqa: BLE001
        ref, py_category = None, python_category(exc)
    rt = native.Runtime(str(path), format="torchscript", threads=1)
    try:
        result = rt.predict_array(array[None], topk=1)[0]
        got, nat_category = result["probs"], (None if result["error"] is None else native_category(result["error"]))
    except (native.NativeError, TypeError) as exc:
        got, nat_category = None, native_category(str(exc))
    assert (py_category, nat_category) == (category, category)
    if category is None:
        assert np.abs(got - ref).max() <= TOL
