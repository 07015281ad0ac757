"""Image decoding that turns every real-world file into the same thing: an RGB uint8 array.

The rules here are the preprocessing contract's first step, so they are deliberately simple enough
to reproduce outside Python (the C++ runtime follows them):

- EXIF orientation is applied.
- Palette, grayscale, CMYK and 1-bit images are converted to RGB by PIL's standard conversions.
- Alpha is dropped (not composited): RGBA -> RGB keeps the colour channels as stored.
- 16-bit images are scaled to 8 bits by rounding ``v / 257``.
- Animated GIF/WebP: the first frame.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Refuse decompression bombs early; a 16k x 16k photo is still accepted.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ImageDecodeError(ValueError):
    """An image file could not be decoded; the message names the file and the reason."""


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any PIL mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "I" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            gray = arr.astype(np.uint8)
        else:
            gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "F":
        gray = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # writable (np.asarray's is not): torch can view it without a copy


def decode_image(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes into an (H, W, 3) uint8 RGB array.

    Raises ImageDecodeError naming the file for anything unreadable: missing, truncated, not an
    image, or too large.
    """
    label = name or (os.fspath(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot open ({exc.strerror or exc})") from exc
    try:
        with fp, Image.open(fp) as img:
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = _to_rgb_array(img)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{label}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, Image.UnidentifiedImageError):
            reason = "not a recognised image format"
        raise ImageDecodeError(f"{label}: unreadable image ({reason})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"{label}: decoded to an unexpected shape {arr.shape}")
    return arr


def _decode_or_error(path: str) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(path), None
    except ImageDecodeError as exc:
        return None, str(exc)


def decode_all(paths: list[str], cache_budget_bytes: int = 0,
               workers: int | None = None) -> tuple[list[np.ndarray] | None, list[str]]:
    """Fully decode every file once. Returns (decoded arrays or None, one message per bad file).

    The arrays are kept only while their total size stays within ``cache_budget_bytes`` (0: never),
    so a small dataset is decoded once for the whole run and a large one is only checked.
    """
    if not paths:
        return ([] if cache_budget_bytes else None), []
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    cache: list[np.ndarray] | None = [] if cache_budget_bytes > 0 else None
    used = 0
    bad = []
    # PIL releases the GIL while decoding, so threads scale across cores here.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for arr, err in pool.map(_decode_or_error, paths, chunksize=64):
            if err is not None:
                bad.append(err)
                if cache is not None:
                    cache.append(None)
                continue
            if cache is not None:
                used += arr.nbytes
                if used > cache_budget_bytes:
                    cache = None
                else:
                    cache.append(arr)
    return cache, bad


def find_bad_images(paths: list[str], workers: int | None = None) -> list[str]:
    """Fully decode every file and return one message per unreadable one."""
    return decode_all(paths, 0, workers)[1]


def load_pil_rgb(path: str | Path) -> Image.Image:
    """The same decode as decode_image, as a PIL image (for visualisation)."""
    return Image.fromarray(decode_image(path))
