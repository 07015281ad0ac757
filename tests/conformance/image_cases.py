"""Images (and arrays) every reader of a bundle must treat the same way: tests/conformance runs each
through the Python loader, the pybind11 module and the classify binary.

IMAGE_CASES: (file name, writer) where writer(path) writes the image file (the shape of
tests/native/decode_cases.py's DECODE_CASES, which joins this list); every reader must decode it and
give the same probabilities. BAD_IMAGE_CASES: (file name, writer, category) that every reader must
refuse, per image, with that error category. ARRAY_CASES: (name, make_array, category or None) for
the two readers that take decoded pixels (export.load_bundle(...).predict and
classify_native.Runtime.predict_array); make_array() returns an (H, W, C) array. Append to the lists
to add a case (CMYK, 16-bit grey, PNG EXIF, float arrays: tests/native/decode_cases.py).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from native.decode_cases import DECODE_CASES
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
    *DECODE_CASES,   # CMYK with and without an Adobe marker, 16-bit grey, EXIF/XMP in PNG (tests/native)
]

BAD_IMAGE_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated.jpg", _writer(lambda: encode(_photo(), "JPEG", quality=90)[:200]), "image"),
    ("not_an_image.png", _writer(lambda: b"this is text, not a PNG\n" * 4), "image"),
]

ARRAY_CASES = [
    ("uint8_rgb", lambda: smooth_rgb(40, 44, 8), None),
    ("four_channels", lambda: np.zeros((40, 44, 4), np.uint8), "input"),
    ("float32_pixels", lambda: smooth_rgb(40, 44, 8).astype(np.float32), "input"),
]
