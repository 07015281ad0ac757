"""Image cases where C++ and Python once decoded differently (issue 14): CMYK JPEGs with and without
an Adobe marker, 16-bit grey PNGs of full and small range, orientation in PNG chunks (eXIf, the
"Raw profile type exif" text chunk) and in XMP; phone-camera MPO files and progressive JPEGs (issue 20).

``DECODE_CASES`` is a list of ``(file name, writer)``; ``writer(path)`` writes the image file. The
conformance suite (tests/conformance/image_cases.py) has the same shape and joins this list.
``KNOWN_COLOURS`` gives, per case, pixels whose decoded RGB the documented rule fixes exactly;
``ORIENTATIONS`` the orientation each orientation case must be turned by.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

# CMYK ink -> RGB by PIL's cmyk2rgb (rgb = (255 - k) * (1 - ink / 255)), exact for these values
_CMYK_BLOCKS = [  # (C, M, Y, K) -> (R, G, B)
    ((0, 255, 255, 0), (255, 0, 0)),
    ((255, 0, 255, 0), (0, 255, 0)),
    ((255, 255, 0, 0), (0, 0, 255)),
    ((0, 0, 0, 0), (255, 255, 255)),
]


def _cmyk_blocks() -> Image.Image:
    """A 32x32 CMYK image of four flat 16x16 blocks (flat: JPEG keeps them within a level or two)."""
    arr = np.zeros((32, 32, 4), np.uint8)
    for i, (cmyk, _) in enumerate(_CMYK_BLOCKS):
        y, x = 16 * (i // 2), 16 * (i % 2)
        arr[y:y + 16, x:x + 16] = cmyk
    return Image.fromarray(arr, "CMYK")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def strip_adobe_marker(data: bytes) -> bytes:
    """The JPEG without its APP14 "Adobe" segments (everything else byte for byte)."""
    out, pos = bytearray(data[:2]), 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        seg = data[pos:pos + 2 + length]
        if not (data[pos + 1] == 0xEE and seg[4:9] == b"Adobe"):
            out += seg
        pos += 2 + length
    assert b"Adobe" not in data[pos:pos + 16]
    return bytes(out + data[pos:])


def cmyk_adobe_jpeg() -> bytes:
    """PIL writes CMYK JPEGs the Photoshop way: inverted ink values plus an Adobe APP14 marker."""
    data = _jpeg(_cmyk_blocks())
    assert b"Adobe" in data[:200]
    return data


def cmyk_plain_jpeg() -> bytes:
    """Plain (non-inverted) CMYK with no Adobe marker: PIL inverts on write, so write the inverse."""
    inverse = Image.fromarray(255 - np.asarray(_cmyk_blocks()), "CMYK")
    return strip_adobe_marker(_jpeg(inverse))


def cmyk_photo_jpeg(adobe: bool) -> bytes:
    """A photo-like CMYK JPEG (every ink level used), with or without the Adobe marker."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:29, 0:41].astype(np.float64)
    ink = np.stack([127 + 120 * np.sin(x / 6), 127 + 120 * np.cos(y / 5), 127 + 120 * np.sin((x + y) / 9),
                    60 + 50 * np.cos(x / 4)], -1) + rng.normal(0, 8, (29, 41, 4))
    data = _jpeg(Image.fromarray(np.clip(ink, 0, 255).astype(np.uint8), "CMYK"))
    return data if adobe else strip_adobe_marker(data)


def ycck_jpeg() -> bytes:
    """An Adobe YCCK JPEG (transform 2): PIL cannot write one, so write the photo's four channels
    as CMYK and flip the APP14 transform byte from 0 (none) to 2 (YCCK); libjpeg then converts
    YCC back to CMYK in both readers, and the marker makes both take the result as inverted."""
    data = bytearray(cmyk_photo_jpeg(True))
    at = data.index(b"Adobe")
    assert data[at - 4:at - 2] == b"\xff\xee" and data[at + 11] == 0
    data[at + 11] = 2
    return bytes(data)


def gray16_png(high: int, seed: int) -> bytes:
    """A 16-bit grey PNG with values in 0..high (both ends present)."""
    arr = np.random.default_rng(seed).integers(0, high + 1, (19, 27), dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 0, high
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def mpo_jpeg(orientation: int = 1) -> bytes:
    """An MPO (a JPEG plus an MPF APP2 segment and a second frame, as phone and stereo cameras write):
    PIL opens it as format "MPO"; both readers decode frame 0. ``orientation``: EXIF of frame 0."""
    first = Image.fromarray(_smooth(36, 52, 11))
    second = Image.fromarray(_smooth(36, 52, 12)[::-1])
    kw: dict = {"exif": _exif_block(orientation)} if orientation != 1 else {}
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second], quality=90, **kw)
    return buf.getvalue()


def progressive_jpeg(h: int = 45, w: int = 61) -> bytes:
    """A progressive JPEG (PIL/libjpeg's default script: 10 scans for colour)."""
    buf = io.BytesIO()
    Image.fromarray(_smooth(h, w, 13)).save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


def many_scans_jpeg(scans: int) -> bytes:
    """A progressive JPEG with ``scans`` scans in all: its last scan (an AC refinement) repeated before
    EOI. libjpeg only warns about a repeated scan, so without a limit every copy is one more pass over
    the image. PIL writes no other FF DA pair (entropy data stuffs every FF), so rindex finds the scan."""
    data = progressive_jpeg(24, 32)
    assert data.count(b"\xff\xda") == 10 and data.endswith(b"\xff\xd9")
    last = data[data.rindex(b"\xff\xda"):-2]
    return data[:-2] + last * (scans - 10) + b"\xff\xd9"


def sos_pairs_in_app_segment_jpeg() -> bytes:
    """A progressive JPEG whose APP15 segment holds 600 FF DA byte pairs (as a thumbnail or an ICC
    profile may): not scans. The cheap pair count exceeds the limit, the marker walk does not."""
    data = progressive_jpeg()
    payload = b"junk" + b"\xff\xda" * 600
    return data[:2] + b"\xff\xef" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 gradients plus noise (JPEG-friendly, every channel different)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 100 * np.sin(x / 9 + seed), 128 + 100 * np.cos(y / 7), 128 + 90 * np.sin((x + y) / 11)], -1)
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _exif_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()  # b"Exif\0\0" + TIFF block


def raw_profile_exif(orientation: int) -> str:
    """ImageMagick's "Raw profile type exif" text: newline, name, length, then hex in lines of 72."""
    block = _exif_block(orientation)
    hexed = block.hex()
    lines = "\n".join(hexed[i:i + 72] for i in range(0, len(hexed), 72))
    return f"\nexif\n{len(block):8d}\n{lines}\n"


def _odd_rgb() -> Image.Image:
    y, x = np.mgrid[0:13, 0:21]
    arr = np.stack([x * 12, y * 19, (x * y) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr)


def png_exif(orientation: int, where: str, second: int | None = None) -> bytes:
    """A 21x13 RGB PNG with its EXIF orientation in ``where``: "eXIf", "tEXt", "zTXt" or "iTXt".
    ``second``: also an eXIf chunk with this orientation (PIL prefers eXIf over the text chunk)."""
    info = PngImagePlugin.PngInfo()
    kw: dict = {}
    if where == "eXIf":
        kw["exif"] = _exif_block(orientation)
    elif where == "iTXt":
        info.add_itxt("Raw profile type exif", raw_profile_exif(orientation))
    else:
        info.add_text("Raw profile type exif", raw_profile_exif(orientation), zip=where == "zTXt")
    if second is not None:
        kw["exif"] = _exif_block(second)
    buf = io.BytesIO()
    _odd_rgb().save(buf, "PNG", pnginfo=info, **kw)
    return buf.getvalue()


def png_xmp_orientation(orientation: int, exif_without_orientation: bool = False) -> bytes:
    """Orientation only in an XMP packet (PIL's getexif falls back to it when EXIF has no tag)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>')
    kw: dict = {}
    if exif_without_orientation:
        exif = Image.Exif()
        exif[0x010F] = "camera maker"  # Make: an EXIF block, but no orientation tag in it
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    _odd_rgb().save(buf, "PNG", pnginfo=info, **kw)
    return buf.getvalue()


def jpeg_xmp_orientation(orientation: int) -> bytes:
    """A JPEG whose only orientation is XMP's <tiff:Orientation>N</...> element form."""
    buf = io.BytesIO()
    _odd_rgb().save(buf, "JPEG", quality=90,
                    xmp=f"<x:xmpmeta><tiff:Orientation>{orientation}</tiff:Orientation></x:xmpmeta>".encode())
    return buf.getvalue()


def png_malformed_raw_profile() -> bytes:
    """A "Raw profile type exif" chunk that is not hex: ignored (no orientation), not an error."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n      12\nnot hex at all\n")
    buf = io.BytesIO()
    _odd_rgb().save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _writer(make: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: Path(path).write_bytes(make())


DECODE_CASES: list[tuple[str, Callable[[Path], None]]] = [
    ("cmyk_adobe.jpg", _writer(cmyk_adobe_jpeg)),
    ("cmyk_no_adobe.jpg", _writer(cmyk_plain_jpeg)),
    ("cmyk_photo_adobe.jpg", _writer(lambda: cmyk_photo_jpeg(True))),
    ("cmyk_photo_no_adobe.jpg", _writer(lambda: cmyk_photo_jpeg(False))),
    ("ycck_adobe.jpg", _writer(ycck_jpeg)),
    ("gray16_full.png", _writer(lambda: gray16_png(65535, 1))),
    ("gray16_12bit.png", _writer(lambda: gray16_png(4095, 2))),
    ("gray16_under256.png", _writer(lambda: gray16_png(255, 3))),
    ("exif6_exif_chunk.png", _writer(lambda: png_exif(6, "eXIf"))),
    ("exif6_raw_profile_text.png", _writer(lambda: png_exif(6, "tEXt"))),
    ("exif8_raw_profile_ztxt.png", _writer(lambda: png_exif(8, "zTXt"))),
    ("exif5_raw_profile_itxt.png", _writer(lambda: png_exif(5, "iTXt"))),
    ("exif3_chunk_wins_over_text.png", _writer(lambda: png_exif(6, "tEXt", second=3))),
    ("xmp8_only.png", _writer(lambda: png_xmp_orientation(8))),
    ("xmp6_after_exif_without_tag.png", _writer(lambda: png_xmp_orientation(6, exif_without_orientation=True))),
    ("xmp7_only.jpg", _writer(lambda: jpeg_xmp_orientation(7))),
    ("raw_profile_not_hex.png", _writer(png_malformed_raw_profile)),
    ("mpo_frame0.jpg", _writer(mpo_jpeg)),
    ("mpo_exif6.jpg", _writer(lambda: mpo_jpeg(6))),
    ("progressive.jpg", _writer(progressive_jpeg)),
    ("scans_500.jpg", _writer(lambda: many_scans_jpeg(500))),   # at the limit: decoded
    ("sos_pairs_in_app_segment.jpg", _writer(sos_pairs_in_app_segment_jpeg)),
]

# name -> the EXIF orientation each case must come out with (PIL's exif_transpose numbering)
ORIENTATIONS: dict[str, int] = {
    "exif6_exif_chunk.png": 6, "exif6_raw_profile_text.png": 6, "exif8_raw_profile_ztxt.png": 8,
    "exif5_raw_profile_itxt.png": 5, "exif3_chunk_wins_over_text.png": 3, "xmp8_only.png": 8,
    "xmp6_after_exif_without_tag.png": 6, "xmp7_only.jpg": 7, "raw_profile_not_hex.png": 1,
    "mpo_exif6.jpg": 6,
}

# name -> [((y, x), (r, g, b))]: centre pixels of the CMYK blocks, exact by the rule in docs/native.md
KNOWN_COLOURS: dict[str, list[tuple[tuple[int, int], tuple[int, int, int]]]] = {
    name: [((16 * (i // 2) + 8, 16 * (i % 2) + 8), rgb) for i, (_, rgb) in enumerate(_CMYK_BLOCKS)]
    for name in ("cmyk_adobe.jpg", "cmyk_no_adobe.jpg")
}
