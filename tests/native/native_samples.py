"""Test images for the native runtime tests: every decode case the C++ side must match PIL on."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: gradients plus mild noise (JPEG chroma matters)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 100 * np.sin(x / (w / 5 + 1) + seed), 128 + 100 * np.cos(y / (h / 4 + 1)),
                     128 + 90 * np.sin((x + y) / (h / 3 + 2))], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_rgb16(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one): (H, W, 3) uint16 -> bytes."""
    h, w, _ = arr.shape
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def sample_images() -> dict[str, bytes]:
    """name -> encoded bytes over the cases the decoder must match PIL on."""
    rgb = Image.fromarray(smooth_rgb(37, 53, 1))
    odd = Image.fromarray(smooth_rgb(61, 29, 2))
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(np.concatenate([smooth_rgb(40, 44, 4), rng.integers(0, 256, (40, 44, 1), dtype=np.uint8)], -1))
    g16 = Image.fromarray(rng.integers(0, 65536, (23, 31), dtype=np.uint16))
    out = {
        "rgb420.jpg": encode(rgb, "JPEG", quality=90),
        "rgb444.jpg": encode(rgb, "JPEG", quality=95, subsampling=0),
        "rgb422.jpg": encode(odd, "JPEG", quality=80, subsampling=1),
        "odd_progressive.jpg": encode(odd, "JPEG", quality=85, progressive=True),
        "gray.jpg": encode(rgb.convert("L"), "JPEG", quality=90),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "rgb.png": encode(rgb, "PNG"),
        "odd.png": encode(odd, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "gray.png": encode(rgb.convert("L"), "PNG"),
        "gray_alpha.png": encode(rgba.convert("LA"), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "palette_trns.png": encode(rgb.convert("P"), "PNG", transparency=3),
        "bilevel.png": encode(rgb.convert("1"), "PNG"),
        "gray16.png": encode(g16, "PNG"),
        "rgb16.png": png_rgb16(rng.integers(0, 65536, (9, 13, 3), dtype=np.uint16)),
        "tiny_1x1.png": encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"),
    }
    for o in range(1, 9):  # EXIF orientation, as PIL's exif_transpose applies it
        exif = Image.Exif()
        exif[0x0112] = o
        out[f"exif{o}.jpg"] = encode(odd, "JPEG", quality=90, exif=exif.tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif6.png"] = encode(odd, "PNG", exif=exif.tobytes())
    return out
