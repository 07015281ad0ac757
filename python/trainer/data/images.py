"""Image decoding that turns every real-world file into the same thing: an RGB uint8 array.

The rules here are the preprocessing contract's first step, so they are deliberately simple enough
to reproduce outside Python (the C++ runtime follows them):

- EXIF orientation is applied.
- Palette, grayscale, CMYK and 1-bit images are converted to RGB by PIL's standard conversions.
- CMYK JPEG: stored inverted (Photoshop's convention) when an Adobe APP14 marker is present, plain
  CMYK when not. PIL assumes inverted for every CMYK JPEG, so a marker-less one is re-inverted here.
- Alpha is dropped (not composited): RGBA -> RGB keeps the colour channels as stored.
- 16-bit grey is scaled to 8 bits by rounding ``v / 257`` (PNG: whatever the values' range); 16-bit
  colour keeps the high byte (PIL's only way to read it).
- EXIF orientation comes from JPEG APP1, PNG eXIf or, failing that, ImageMagick's
  "Raw profile type exif" PNG text chunk (all as PIL's ``getexif``).
- Animated GIF/WebP: the first frame.

JPEGs in YCbCr/RGB or grayscale are decoded by libjpeg-turbo through simplejpeg when it is
installed: the same library and settings as PIL's decoder (accurate integer IDCT, fancy upsampling),
so the pixels are identical (tests compare every subsampling, progressive and grayscale files and
all eight EXIF orientations), at about half the CPU time, with no intermediate PIL image. Anything
else, and any file simplejpeg refuses, goes through PIL.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError

try:   # optional fast path for JPEG (see the module docstring)
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; PIL alone gives the same pixels
    simplejpeg = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Refuse decompression bombs early; a 16k x 16k photo is still accepted.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ImageDecodeError(UserError):
    """An image file could not be decoded; the message names the file and the reason."""


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _plain_cmyk(img: Image.Image) -> Image.Image:
    """A JPEG's CMYK as stored: PIL inverts every 4-component JPEG (its "CMYK;I" raw mode), which is
    right only with an Adobe APP14 marker (Photoshop's inverted convention); without one the data
    is plain CMYK, so undo PIL's inversion. The C++ decoder applies the same rule."""
    if img.mode == "CMYK" and img.format == "JPEG" and "adobe" not in img.info:
        return Image.fromarray(255 - np.asarray(img), "CMYK")
    return img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any PIL mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 32-bit "I" holding 8-bit values (e.g. some TIFFs) is taken as is; a 16-bit PNG never is,
        # whatever its range (older PIL opened it as "I"): round(v/257), as the C++ decoder.
        if img.mode == "I" and img.format != "PNG" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            gray = arr.astype(np.uint8)
        else:
            gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "F":
        gray = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "P":
        img = img.convert("RGBA")
    img = _plain_cmyk(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # writable (np.asarray's is not): torch can view it without a copy


# EXIF orientation -> the numpy view that PIL's exif_transpose produces
_ORIENT = {
    2: lambda a: a[:, ::-1],                      # mirror left-right
    3: lambda a: a[::-1, ::-1],                   # rotate 180
    4: lambda a: a[::-1],                         # mirror top-bottom
    5: lambda a: a.transpose(1, 0, 2),            # transpose
    6: lambda a: np.rot90(a, -1),                 # rotate 90 clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),   # transverse
    8: lambda a: np.rot90(a, 1),                  # rotate 90 counter-clockwise
}


def _drop_malformed_raw_profile(img: Image.Image) -> None:
    """Ignore a PNG "Raw profile type exif" text chunk that is not hex (PIL's getexif would raise
    and make the whole image unreadable); the C++ decoder ignores it too."""
    text = img.info.get("Raw profile type exif")
    if isinstance(text, str):
        try:
            bytes.fromhex("".join(text.split("\n")[3:]))
        except ValueError:
            del img.info["Raw profile type exif"]


def _decode_jpeg_fast(img: Image.Image, data: bytes) -> np.ndarray | None:
    """(H, W, 3) uint8 via simplejpeg for a plain JPEG whose header PIL has read; None -> use PIL."""
    if simplejpeg is None or img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:   # truncated or odd files: PIL decides, with its own error message
        return None
    orient = _ORIENT.get(img.getexif().get(0x0112, 1))
    return np.ascontiguousarray(orient(arr)) if orient else arr


def decode_image(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes into an (H, W, 3) uint8 RGB array.

    Raises ImageDecodeError naming the file for anything unreadable: missing, truncated, not an
    image, or too large.
    """
    label = name or (os.fspath(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    try:
        if isinstance(source, (bytes, bytearray)):
            data = source
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot open ({exc.strerror or exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = _decode_jpeg_fast(img, data)
            if arr is None:
                img.seek(0)
                img.load()
                _drop_malformed_raw_profile(img)
                ImageOps.exif_transpose(img, in_place=True)   # no copy of the pixels when upright
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
