"""Images (and arrays) every reader of a bundle must treat the same way: tests/conformance runs each
through the Python loader, the pybind11 module and the classify binary.

IMAGE_CASES: (file name, writer) where writer(path) writes the image file (the shape of
tests/native/decode_cases.py's DECODE_CASES, which joins this list); every reader must decode it and
give the same probabilities. BAD_IMAGE_CASES: (file name, writer, category) that every reader must
refuse, per image, with that error category. ARRAY_CASES: (name, make_array, category or None) for
the two readers that take decoded pixels (export.load_bundle(...).predict and
classify_native.Runtime.predict_array); make_array() returns an (H, W, C) array. Append to the lists
to add a case (CMYK, 16-bit grey, PNG EXIF, MPO, progressive JPEG: tests/native/decode_cases.py).
LARGE_IMAGE_CASES: (file name, writer) decoded by every reader like IMAGE_CASES, but with one bundle
only (a 21 MP image costs seconds per reader).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from native.decode_cases import DECODE_CASES, many_scans_jpeg
from native.native_samples import encode, smooth_rgb


def _photo(h: int = 45, w: int = 38, seed: int = 5) -> Image.Image:
    return Image.fromarray(smooth_rgb(h, w, seed))


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encode(_photo(40, 56, 6), "JPEG", quality=90, exif=exif.tobytes())


def _rgba_png() -> bytes:
    alpha = np.random.default_rng(7).integers(0, 256, (44, 40, 1), dtype=np.uint8)
    return encode(Image.fromarray(np.concatenate([smooth_rgb(44, 40, 7), alpha], -1)), "PNG")


def _writer(make: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: Path(path).write_bytes(make())


IMAGE_CASES: list[tuple[str, Callable[[Path], None]]] = [
    ("rgb.jpg", _writer(lambda: encode(_photo(), "JPEG", quality=90))),
    ("rgb.png", _writer(lambda: encode(_photo(), "PNG"))),
    ("grey.png", _writer(lambda: encode(_photo().convert("L"), "PNG"))),
    ("grey.jpg", _writer(lambda: encode(_photo().convert("L"), "JPEG", quality=90))),
    ("palette.png", _writer(lambda: encode(_photo().convert("P"), "PNG"))),
    ("rgba.png", _writer(_rgba_png)),
    ("exif6.jpg", _writer(_exif_rotated_jpeg)),
    *DECODE_CASES,   # CMYK with and without an Adobe marker, 16-bit grey, EXIF/XMP in PNG, MPO, progressive
]


def _grey16_large_png(path: Path) -> None:
    """5000 x 4200 (21 MP) 16-bit grey: diagonal ramps over the whole 0..65535 range (so round(v/257)
    matters), about 0.4 MB as PNG (rows differ by a constant: PNG's filters make them compress)."""
    ramp_x = np.arange(5000, dtype=np.uint16) * np.uint16(13)   # wraps mod 65536: every value occurs
    ramp_y = np.arange(4200, dtype=np.uint16) * np.uint16(7)
    Image.fromarray(ramp_x[None, :] + ramp_y[:, None]).save(path, "PNG")


LARGE_IMAGE_CASES: list[tuple[str, Callable[[Path], None]]] = [
    ("gray16_21mp.png", _grey16_large_png),
]

BAD_IMAGE_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated.jpg", _writer(lambda: encode(_photo(), "JPEG", quality=90)[:200]), "image"),
    ("not_an_image.png", _writer(lambda: b"this is text, not a PNG\n" * 4), "image"),
    # 3,000 scans (a progressive JPEG has 10): refused from its markers before decoding (scan limit 500)
    ("scans_3000.jpg", _writer(lambda: many_scans_jpeg(3000)), "image"),
]

ARRAY_CASES = [
    ("uint8_rgb", lambda: smooth_rgb(40, 44, 8), None),
    ("four_channels", lambda: np.zeros((40, 44, 4), np.uint8), "input"),
    ("float32_pixels", lambda: smooth_rgb(40, 44, 8).astype(np.float32), "input"),
]
