"""The pybind11 module never writes past a buffer and never guesses: a bundle whose class list does
not match its model is refused at load (warm-up call), non-uint8 pixels are a TypeError naming the
dtype and the fix, wrong shapes a ValueError naming the shape.

    pytest -q tests/native/test_binding_guards.py
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # shares the trained/exported bundles with test_runtime.py


def _with_classes(bundle, tmp_path, delta: int):
    """A copy of the bundle whose manifest lists ``delta`` more (or fewer) classes than the model has."""
    out = tmp_path / f"classes{delta:+d}"
    shutil.copytree(bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    k = len(m["classes"])
    m["classes"] = m["classes"][:k + delta] if delta < 0 else m["classes"] + [f"extra{i}" for i in range(delta)]
    m["output"]["shape"] = [-1, len(m["classes"])]  # consistent manifest: only the model disagrees
    (out / "manifest.json").write_text(json.dumps(m))
    return out, k


@pytest.mark.parametrize("delta", [-1, 3])
@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_a_class_list_that_does_not_match_the_model_is_refused_at_load(native, bundle_a, tmp_path, delta, fmt):
    bad, k = _with_classes(bundle_a, tmp_path, delta)
    with pytest.raises(native.BundleError, match=rf"lists {k + delta} classes but the model model\.\w+ outputs {k} "
                                                 r"scores per image.*re-export"):
        native.Runtime(str(bad), format=fmt, threads=1)


def test_the_cli_refuses_it_too(classify_bin, bundle_a, eval_images, tmp_path):
    import subprocess

    bad, k = _with_classes(bundle_a, tmp_path, -1)
    for extra in ([eval_images[0]], ["--bench", "1"]):
        res = subprocess.run([str(classify_bin), "--bundle", str(bad), "--threads", "1", *extra],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert f"lists {k - 1} classes but the model" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def runtime(native, bundle_a):
    return native.Runtime(str(bundle_a), format="torchscript", threads=1, tta="none")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16, np.int8, bool])
def test_non_uint8_pixels_are_a_type_error_naming_dtype_and_fix(native, runtime, dtype):
    images = np.zeros((2, 40, 40, 3), dtype)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"predict_array takes a uint8 \(N, H, W, 3\).*got dtype {name}.*astype"):
        runtime.predict_array(images)
    with pytest.raises(TypeError, match=rf"run_preprocessed takes a uint8 .*got dtype {name}"):
        runtime.run_preprocessed(np.zeros((2, 3, 32, 32), dtype))
    with pytest.raises(TypeError, match=rf"preprocess takes a uint8 \(H, W, 3\).*got dtype {name}"):
        native.preprocess(images[0], (32, 32), 36)


def test_floats_in_0_1_are_not_silently_cast(runtime):
    # The old binding force-cast these to all-zero uint8 and returned a confident answer for black.
    with pytest.raises(TypeError, match="float32"):
        runtime.predict_array(np.random.default_rng(0).random((1, 40, 40, 3), dtype=np.float32))


@pytest.mark.parametrize("shape,what", [((40, 40, 3), "ndim"), ((1, 40, 40, 4), "channels"), ((1, 40, 40), "ndim"),
                                        ((1, 3, 40, 40), "channels")])
def test_wrong_shapes_name_the_shape(native, runtime, shape, what):
    shown = re.escape("(" + ", ".join(map(str, shape)) + ")")
    with pytest.raises(native.OptionError, match=rf"\(N, H, W, 3\) RGB array, got shape {shown}"
                                                 + (r"; axis 3 must hold the 3 RGB channels" if what == "channels" else "")):
        runtime.predict_array(np.zeros(shape, np.uint8))


def test_run_preprocessed_checks_layout_and_size(native, runtime):
    with pytest.raises(native.OptionError, match=r"got shape \(2, 32, 32, 3\)"):
        runtime.run_preprocessed(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(native.OptionError, match=r"expected \(N, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        runtime.run_preprocessed(np.zeros((2, 3, 28, 28), np.uint8))
    out = runtime.run_preprocessed(np.zeros((2, 3, 32, 32), np.uint8))
    assert out.shape == (2, len(runtime.classes)) and np.allclose(out.sum(1), 1, atol=1e-4)


def test_strided_uint8_views_are_accepted_and_equal_to_contiguous(native, runtime):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (2, 80, 90, 3), dtype=np.uint8)
    view = big[:, ::2, ::2]  # not C-contiguous: copied, not refused
    a = runtime.predict_array(view, topk=1)
    b = runtime.predict_array(np.ascontiguousarray(view), topk=1)
    assert [r["topk"] for r in a] == [r["topk"] for r in b]
    assert np.array_equal(native.preprocess(view[0], (32, 32), 36), native.preprocess(np.ascontiguousarray(view[0]),
                                                                                      (32, 32), 36))
