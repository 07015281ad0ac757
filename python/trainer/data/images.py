"""Image decoding that turns every real-world file into the same thing: an RGB uint8 array.

The rules here are the preprocessing contract's first step, so they are deliberately simple enough
to reproduce outside Python (the C++ runtime follows them):

- EXIF orientation is applied.
- Palette, grayscale, CMYK and 1-bit images are converted to RGB by PIL's standard conversions.
- CMYK JPEG: stored inverted (Photoshop's convention) when an Adobe APP14 marker is present, plain
  CMYK when not. PIL assumes inverted for every CMYK JPEG, so a marker-less one is re-inverted here.
- Alpha is dropped (not composited): RGBA -> RGB keeps the colour channels as stored.
- 16-bit grey is scaled to 8 bits by rounding ``v / 257`` (PNG: whatever the values' range), in
  integers and a band of rows at a time (the RGB result is the only full-size array); 16-bit
  colour keeps the high byte (PIL's only way to read it).
- EXIF orientation comes from JPEG APP1, PNG eXIf or, failing that, ImageMagick's
  "Raw profile type exif" PNG text chunk (all as PIL's ``getexif``).
- Animated GIF/WebP and MPO (a JPEG with an MPF secondary image: phone and stereo cameras): the
  first frame.
- Formats: ``IMAGE_FORMATS`` (PIL's names, from ``trainer.image_formats``), the one list that
  training, the bundle loader and the server accept; anything else is refused naming the list.
- JPEG scans: a multi-scan JPEG (progressive, or sequential whose first scan does not hold every
  component: libjpeg's ``jpeg_has_multiple_scans``) with more than ``MAX_JPEG_SCANS`` scans before its
  first EOI is refused before decoding (each scan is one more pass over the whole image, so the
  decode time grows with the count, whatever the file size; libjpeg-turbo's own fuzzers refuse more
  than 500). A normal progressive JPEG has 10.

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
from ..image_formats import IMAGE_FORMATS   # the one list (the server's default too)

try:   # optional fast path for JPEG (see the module docstring)
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; PIL alone gives the same pixels
    simplejpeg = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".mpo", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_JPEG_FORMATS = ("JPEG", "MPO")   # MPO's first frame is a plain JPEG stream
MAX_JPEG_SCANS = 500              # libjpeg-turbo's fuzzers' TJPARAM_SCANLIMIT; the C++ decoder's too

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
    if img.mode == "CMYK" and img.format in _JPEG_FORMATS and "adobe" not in img.info:
        return Image.fromarray(255 - np.asarray(img), "CMYK")
    return img


_BAND_PIXELS = 1 << 18   # grey conversions work on bands of rows of about this many pixels


def _grey_to_rgb(img: Image.Image, to_uint8) -> np.ndarray:
    """(H, W, 3) uint8 from a one-channel PIL image, ``to_uint8`` applied a band of rows at a time:
    the only full-size array is the result (a 40 MP 16-bit image took about 1 GB through float64)."""
    w, h = img.size
    out = np.empty((h, w, 3), np.uint8)
    step = max(1, _BAND_PIXELS // max(w, 1))
    for y in range(0, h, step):
        band = np.asarray(img.crop((0, y, w, min(h, y + step))))   # (rows, W), the band's copy only
        out[y:y + step] = to_uint8(band)[:, :, None]
    return out


def grey16_to_uint8(values: np.ndarray) -> np.ndarray:
    """round(v / 257) in integers, clipped to 0..255: 16-bit (or wider) grey to 8 bits.

    ``(v + 128) // 257`` is exactly ``rint(v / 257)``: v / 257 is never a tie (257 is odd), and
    values outside 0..65535 (32-bit "I" images) clip to 0 or 255 as the float formula did.
    """
    wide = np.clip(values, 0, 65535).astype(np.uint32) if values.dtype != np.uint16 else values.astype(np.uint32)
    wide += 128          # in place: one uint32 temporary per call
    wide //= 257
    return wide.astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any PIL mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 32-bit "I" holding 8-bit values (e.g. some TIFFs) is taken as is; a 16-bit PNG never is,
        # whatever its range (older PIL opened it as "I"): round(v/257), as the C++ decoder.
        low, high = img.getextrema()   # PIL's C pass over the pixels: no copy
        if img.mode == "I" and img.format != "PNG" and high <= 255 and low >= 0:
            return _grey_to_rgb(img, lambda v: v.astype(np.uint8))
        return _grey_to_rgb(img, grey16_to_uint8)
    if img.mode == "F":
        return _grey_to_rgb(img, lambda v: np.clip(np.rint(v), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    img = _plain_cmyk(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # writable (np.asarray's is not): torch can view it without a copy


# ---- JPEG scans (see the module docstring) ------------------------------------------------------
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # DHT, JPG and DAC share the range
_PROGRESSIVE_SOF = (0xC2, 0xCA)   # the progressive frames libjpeg-turbo decodes (Huffman, arithmetic)
_NO_LENGTH = frozenset((0x01, *range(0xD0, 0xD9)))   # TEM, RSTn, SOI: markers without a segment


def _next_marker(data: bytes, pos: int) -> tuple[int, int]:
    """(marker code, index after it) of the first marker at or after ``pos``, found as libjpeg's
    next_marker does: other bytes skipped, FF fill bytes skipped, FF 00 (stuffing) is no marker.
    (-1, len(data)) when there is none."""
    n = len(data)
    while True:
        i = data.find(b"\xff", pos)
        if i < 0:
            return -1, n
        j = i + 1
        while j < n and data[j] == 0xFF:
            j += 1
        if j >= n:
            return -1, n
        if data[j] != 0:
            return data[j], j + 1
        pos = j + 1


def _segment_length(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos:pos + 2], "big") if pos + 2 <= len(data) else len(data)


def _segments(data: bytes):
    """(marker code, index after it) of each marker that starts a segment, in order, up to the first
    EOI or the end of the data; segments are skipped by their length, entropy-coded data by
    _next_marker (the C++ decoder's walk)."""
    pos = 2
    while True:
        code, pos = _next_marker(data, pos)
        if code in (-1, 0xD9):
            return
        if code in _NO_LENGTH:
            continue
        yield code, pos
        pos += _segment_length(data, pos)


def jpeg_has_multiple_scans(data: bytes) -> bool:
    """libjpeg's ``jpeg_has_multiple_scans`` read from the headers: a progressive frame, or a first
    scan that does not hold every component. False for anything it cannot read (the decoder says why)."""
    components, progressive = 0, False
    for code, pos in _segments(data):
        if code in _SOF_MARKERS and pos + 8 <= len(data):
            components, progressive = data[pos + 7], code in _PROGRESSIVE_SOF   # length, P, Y, X, Nf
        elif code == 0xDA:
            return progressive or (pos + 2 < len(data) and data[pos + 2] < components)   # length, Ns
    return False


def jpeg_scans_exceed(data: bytes, limit: int = MAX_JPEG_SCANS) -> bool:
    """True when the JPEG has more than ``limit`` scans (SOS markers) before its first EOI."""
    if data.count(b"\xff\xda") <= limit:   # C speed; every SOS is such a pair: an upper bound
        return False
    scans = 0
    for code, _ in _segments(data):
        if code == 0xDA:
            scans += 1
            if scans > limit:
                return True
    return False


def check_jpeg_scans(data: bytes, label: str) -> None:
    """Refuse a multi-scan JPEG with more than MAX_JPEG_SCANS scans, before any decoding."""
    if data[:3] == b"\xff\xd8\xff" and jpeg_has_multiple_scans(data) and jpeg_scans_exceed(data):
        raise ImageDecodeError(
            f"{label}: unreadable image (JPEG with more than {MAX_JPEG_SCANS} scans: a progressive "
            f"JPEG has about 10, and each scan is another pass over the image; re-encode it)")


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
    """(H, W, 3) uint8 via simplejpeg for a plain JPEG (or MPO: its first frame) whose header PIL has
    read; None -> use PIL."""
    if simplejpeg is None or img.format not in _JPEG_FORMATS or img.mode not in ("RGB", "L"):
        return None
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB")   # stops at the first frame's EOI
    except ValueError:   # truncated or odd files: PIL decides, with its own error message
        return None
    orient = _ORIENT.get(img.getexif().get(0x0112, 1))
    return np.ascontiguousarray(orient(arr)) if orient else arr


def _draft(img: Image.Image, short_side: int) -> None:
    """Ask PIL's JPEG decoder for the smallest DCT scale that keeps the shorter side >= short_side
    (draft keeps both sides >= the request)."""
    w, h = img.size
    short = min(w, h)
    img.draft("RGB", (max(1, w * short_side // short), max(1, h * short_side // short)))


def decode_image(source: str | os.PathLike | bytes, name: str | None = None, *,
                 draft_size: int | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes into an (H, W, 3) uint8 RGB array.

    Raises ImageDecodeError naming the file for anything unreadable: missing, truncated, not an
    image, a format outside IMAGE_FORMATS, a JPEG with too many scans, or too large.
    ``draft_size``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps its
    shorter side >= draft_size (PIL's ``Image.draft``; the server's ``--jpeg-draft``): several times
    faster for photos far larger than the model input, not bit-exact. Other formats ignore it.
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
    check_jpeg_scans(data, label)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise ImageDecodeError(format_refusal(label, img.format))
            arr = None if draft_size else _decode_jpeg_fast(img, data)
            if arr is None:
                img.seek(0)
                if draft_size and img.format in _JPEG_FORMATS:
                    _draft(img, draft_size)
                img.load()
                _drop_malformed_raw_profile(img)
                ImageOps.exif_transpose(img, in_place=True)   # no copy of the pixels when upright
                arr = _to_rgb_array(img)
    except ImageDecodeError:
        raise
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


def format_refusal(label: str, fmt: str | None) -> str:
    """The message for an image whose format is not in IMAGE_FORMATS (training and the server)."""
    return f"{label}: image format {fmt or 'unknown'} is not accepted; use one of {', '.join(IMAGE_FORMATS)}"


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
