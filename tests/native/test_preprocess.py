"""Decoding and preprocessing parity: C++ (classify_native) against trainer.data / trainer.tta.

    pytest -q tests/native/test_preprocess.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.data.images import decode_image
from trainer.data.transforms import PreprocessSpec, eval_transform
from trainer.tta import NAMED, apply_views, parse_policy

from .native_samples import sample_images

NAMES = sorted(sample_images())


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_pil(native, image_dir, name):
    """Same RGB pixels as PIL (same libjpeg-turbo ISLOW IDCT and fancy upsampling; same PNG rules)."""
    path = image_dir / name
    want = decode_image(path)
    got = native.decode_file(str(path))
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() == 0, f"{name}: {np.count_nonzero(diff)} pixels differ, max {diff.max()}"
    assert np.array_equal(native.decode_bytes(path.read_bytes()), want)


@pytest.mark.parametrize("kernel", ["uint8", "float32"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop,resize", [((32, 32), 36), ((24, 40), 41), ((17, 17), 17), ((64, 48), 73)])
def test_eval_transform_parity(native, image_dir, interpolation, crop, resize, kernel):
    spec = PreprocessSpec(crop_size=crop, resize_size=resize, interpolation=interpolation, resize_kernel=kernel)
    for name in ("rgb420.jpg", "odd.png", "gray.png", "rgba.png", "exif6.jpg", "tiny_1x1.png"):
        img = decode_image(image_dir / name)
        want = eval_transform(img, spec).numpy()
        got = native.preprocess(img, crop, resize, interpolation, "none", kernel)
        assert got.shape == (1, *want.shape)
        assert np.array_equal(got[0], want), f"{name}: max diff {np.abs(got[0].astype(int) - want).max()}"


@pytest.mark.parametrize("kernel", ["uint8", "float32"])
@pytest.mark.parametrize("policy", [p for p in NAMED if not p.startswith("multiscale")] + ["multiscale:33,40, 47"])
def test_tta_views_parity(native, image_dir, policy, kernel):
    spec = PreprocessSpec(crop_size=(32, 32), resize_size=36, interpolation="bilinear", resize_kernel=kernel)
    views = parse_policy(policy)
    assert native.parse_tta_policy(policy) == [v.to_dict() for v in views]
    img = decode_image(image_dir / "odd_progressive.jpg")  # 29x61: every crop position differs
    want = apply_views(img, spec, views).numpy()
    got = native.preprocess(img, (32, 32), 36, "bilinear", [v.to_dict() for v in views], kernel)
    assert np.array_equal(got, want)


def test_half_pixel_crop_rounds_half_to_even(native):
    """(h - ch) / 2 = 0.5, 1.5, 2.5: Python's round() gives 0, 2, 2; the C++ crop must agree."""
    rng = np.random.default_rng(0)
    for extra in (1, 3, 5):
        img = rng.integers(0, 256, (20 + extra, 20 + extra, 3), dtype=np.uint8)
        spec = PreprocessSpec(crop_size=(20, 20), resize_size=20 + extra)
        assert np.array_equal(native.preprocess(img, (20, 20), 20 + extra, resize_kernel="uint8")[0],
                              eval_transform(img, spec).numpy())


def test_bad_policies_are_refused(native):
    for bad in ("multiscale:", "multiscale:a,b", "sideways"):
        with pytest.raises(native.OptionError, match="policy"):
            native.parse_tta_policy(bad)


@pytest.mark.parametrize("data,why", [(b"", "empty"), (b"GIF89a....", "not a recognised image format"),
                                      ("rgb420.jpg:300", "missing SOS"), ("rgb420.jpg:0.6", "truncated"),
                                      ("odd.png:0.6", "unreadable PNG")])
def test_bad_bytes_name_the_problem(native, image_dir, data, why):
    if isinstance(data, str):  # a real file cut short: in its headers, or in its pixel data
        name, cut = data.split(":")
        full = (image_dir / name).read_bytes()
        data = full[:int(cut) if "." not in cut else int(len(full) * float(cut))]
    with pytest.raises(native.ImageError, match=why):
        native.decode_bytes(data, "upload.jpg")
    with pytest.raises(native.ImageError, match="upload.jpg"):
        native.decode_bytes(data, "upload.jpg")


def test_missing_file_names_the_path(native, tmp_path):
    with pytest.raises(native.ImageError, match="nope.png: cannot open"):
        native.decode_file(str(tmp_path / "nope.png"))


@pytest.mark.parametrize("kernel", ["uint8", "float32"])
def test_same_kernel_parity_is_exact_on_a_photo_sized_image(native, kernel):
    """The resize itself: torch's AA kernel in C++ and Python give identical uint8 on a large image."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (301, 457, 3), dtype=np.uint8)
    spec = PreprocessSpec(crop_size=(224, 224), resize_size=256, interpolation="bicubic", resize_kernel=kernel)
    torch.set_num_threads(2)
    got = native.preprocess(img, (224, 224), 256, "bicubic", resize_kernel=kernel)[0]
    assert np.array_equal(got, eval_transform(img, spec).numpy())


def test_uint8_kernel_is_layout_and_thread_independent_and_within_one_level_of_float32():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    u8 = PreprocessSpec(crop_size=(224, 224), resize_size=256)
    assert u8.resize_kernel == "uint8"
    want = eval_transform(img, u8).numpy()
    torch.set_num_threads(1)
    assert np.array_equal(eval_transform(torch.from_numpy(img).permute(2, 0, 1).contiguous(), u8).numpy(), want)
    torch.set_num_threads(2)
    f32 = eval_transform(img, PreprocessSpec(crop_size=(224, 224), resize_size=256, resize_kernel="float32")).numpy()
    assert np.abs(f32.astype(int) - want).max() == 1
    # specs written before the key existed keep the float32 kernel
    old = u8.to_dict()
    del old["resize_kernel"]
    assert PreprocessSpec.from_dict(old).resize_kernel == "float32"
    with pytest.raises(ValueError, match="resize_kernel"):
        PreprocessSpec(crop_size=(224, 224), resize_size=256, resize_kernel="int4")
