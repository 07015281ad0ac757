"""Decode step: same tensor as trainer's decode_image + eval_transform / apply_views; limits from the header."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from native.decode_cases import many_scans_jpeg, mpo_jpeg
from server import preprocess
from server.config import ServerConfig
from server.errors import APIError
from server.preprocess import DecodeLimits, decode_to_views
from server_fixtures import png_bytes
from trainer.data.images import IMAGE_FORMATS, MAX_JPEG_SCANS, decode_image
from trainer.data.transforms import PreprocessSpec, eval_transform
from trainer.tta import apply_views, parse_policy

SPEC = PreprocessSpec.for_size(32, crop_pct=0.875)
LIMITS = DecodeLimits()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_decode_equals_trainer_reference(fmt):
    data = png_bytes((61, 45), seed=1, fmt=fmt)
    got = decode_to_views(data, "x", SPEC, parse_policy("none"), LIMITS)
    want = eval_transform(decode_image(data), SPEC)
    assert got.dtype.is_floating_point is False and got.shape == (1, 3, 32, 32)
    assert np.array_equal(got[0].numpy(), want.numpy())


def test_tta_views_equal_apply_views():
    data = png_bytes((50, 70), seed=2)
    views = parse_policy("ten-crop")
    got = decode_to_views(data, "x", SPEC, views, LIMITS)
    assert np.array_equal(got.numpy(), apply_views(decode_image(data), SPEC, views).numpy())


def _bmp_header(w: int, h: int) -> bytes:
    """A BMP whose header claims w x h (24-bit) with no pixel data: cheap to send, huge to decode."""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"),
    (b"hello, not an image at all", 415, "not a recognised image"),
    (png_bytes()[:60], 422, "truncated"),
    (_bmp_header(100_000, 100_000), 413, "megapixels"),
    (_bmp_header(8000, 8000), 413, "megapixels"),
])
def test_bad_images_are_refused_with_the_reason(data, status, words):
    with pytest.raises(APIError) as exc:
        decode_to_views(data, "upload.png", SPEC, parse_policy("none"), LIMITS)
    assert exc.value.status == status and words in exc.value.message and "upload.png" in exc.value.message


def test_disallowed_format_is_415():
    with pytest.raises(APIError) as exc:
        decode_to_views(png_bytes(fmt="TIFF"), "a.tif", SPEC, parse_policy("none"), DecodeLimits(allowed_formats=("PNG",)))
    assert exc.value.status == 415 and "TIFF" in exc.value.message


def test_jpeg_draft_decodes_smaller_but_close():
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((16, 16, 1))).astype(np.uint8)   # 480x640, smooth blocks
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG", quality=95)
    exact = decode_to_views(buf.getvalue(), "p.jpg", SPEC, parse_policy("none"), LIMITS).numpy().astype(int)
    fast = decode_to_views(buf.getvalue(), "p.jpg", SPEC, parse_policy("none"),
                           DecodeLimits(jpeg_draft=True)).numpy().astype(int)
    assert fast.shape == exact.shape
    assert np.abs(fast - exact).mean() < 6      # reduced-scale DCT decode: close, not bit-exact


def _sample(fmt: str) -> bytes:
    return mpo_jpeg() if fmt == "MPO" else png_bytes((61, 45), seed=1, fmt=fmt)


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_format_training_accepts_is_accepted(fmt):
    """MPO (phone cameras) was a 415 while training accepted the same file."""
    data = _sample(fmt)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt
    got = decode_to_views(data, "x", SPEC, parse_policy("none"), LIMITS)
    assert np.array_equal(got[0].numpy(), eval_transform(decode_image(data), SPEC).numpy())


def test_the_server_formats_are_trainings_one_list():
    assert DecodeLimits().allowed_formats == ServerConfig().allowed_formats == IMAGE_FORMATS


def test_a_jpeg_with_thousands_of_scans_is_refused_from_its_headers(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("decoded a JPEG the scan limit refuses")

    monkeypatch.setattr(preprocess, "decode_image", never)
    with pytest.raises(APIError) as exc:
        decode_to_views(many_scans_jpeg(3000), "scans.jpg", SPEC, parse_policy("none"), LIMITS)
    assert exc.value.status == 422
    assert f"more than {MAX_JPEG_SCANS} scans" in exc.value.message and "scans.jpg" in exc.value.message


def test_jpeg_draft_decodes_an_mpo_first_frame():
    data = mpo_jpeg()
    exact = decode_to_views(data, "m.jpg", SPEC, parse_policy("none"), LIMITS).numpy().astype(int)
    fast = decode_to_views(data, "m.jpg", SPEC, parse_policy("none"), DecodeLimits(jpeg_draft=True)).numpy().astype(int)
    assert fast.shape == exact.shape and np.abs(fast - exact).mean() < 6
