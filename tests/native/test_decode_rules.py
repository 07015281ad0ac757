"""One decode rule in both readers: CMYK JPEG (Adobe marker or not), 16-bit grey PNG, orientation
from PNG chunks and XMP, MPO (frame 0), progressive JPEG, the JPEG scan limit; each case checked C++
against Python and against the rule itself.

    pytest -q tests/native/test_decode_rules.py
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from trainer.data.images import MAX_JPEG_SCANS, ImageDecodeError, _to_rgb_array, decode_image, jpeg_scans_exceed

from . import decode_cases
from .decode_cases import DECODE_CASES, KNOWN_COLOURS, ORIENTATIONS

CASES = dict(DECODE_CASES)
ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
          7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


@pytest.fixture(scope="module")
def case_bytes(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("decode_cases")
    for name, write in DECODE_CASES:
        write(root / name)
    return {name: (root / name).read_bytes() for name in CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_native_and_python_decode_alike(native, case_bytes, name):
    want = decode_image(case_bytes[name])
    got = native.decode_bytes(case_bytes[name], name)
    assert got.shape == want.shape
    # libjpeg-turbo in both; CMYK JPEG is allowed one level for the conversion's rounding
    tol = 1 if name.endswith(".jpg") else 0
    assert np.abs(got.astype(int) - want.astype(int)).max() <= tol


@pytest.mark.parametrize("name", sorted(KNOWN_COLOURS))
def test_cmyk_known_colours_in_both_readers(native, case_bytes, name):
    # Adobe marker: inverted ink (Photoshop); none: plain CMYK. Red, green, blue, white either way.
    for label, rgb in (("python", decode_image(case_bytes[name])), ("native", native.decode_bytes(case_bytes[name]))):
        for (y, x), colour in KNOWN_COLOURS[name]:
            assert np.abs(rgb[y, x].astype(int) - colour).max() <= 2, (label, (y, x), rgb[y, x], colour)


def test_the_marker_less_case_really_has_no_adobe_marker(case_bytes):
    assert b"Adobe" not in case_bytes["cmyk_no_adobe.jpg"]
    with Image.open(io.BytesIO(case_bytes["cmyk_no_adobe.jpg"])) as img:
        assert img.mode == "CMYK" and "adobe" not in img.info
    with Image.open(io.BytesIO(case_bytes["cmyk_adobe.jpg"])) as img:
        assert img.mode == "CMYK" and "adobe" in img.info


@pytest.mark.parametrize("name", ["gray16_full.png", "gray16_12bit.png", "gray16_under256.png"])
def test_16bit_grey_is_round_v_over_257_in_both(native, case_bytes, name):
    with Image.open(io.BytesIO(case_bytes[name])) as img:
        v = np.asarray(img).astype(np.int64)
    want = np.repeat(((v + 128) // 257).astype(np.uint8)[:, :, None], 3, axis=2)  # round(v/257), no ties
    assert np.array_equal(decode_image(case_bytes[name]), want)
    assert np.array_equal(native.decode_bytes(case_bytes[name]), want)


def test_a_16bit_png_opened_as_mode_I_is_scaled_whatever_its_range(case_bytes):
    """Older PIL opened 16-bit grey PNGs as mode "I": values all <= 255 must still be divided."""
    with Image.open(io.BytesIO(case_bytes["gray16_under256.png"])) as img:
        img.load()
        v = np.asarray(img).astype(np.int64)
        as_i = img.convert("I")
    as_i.format = "PNG"
    assert v.max() == 255
    assert np.array_equal(_to_rgb_array(as_i)[:, :, 0], ((v + 128) // 257).astype(np.uint8))


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientation_is_found_and_applied_in_both(native, case_bytes, name):
    upright = decode_image(_plain_bytes(name))
    turn = ORIENT.get(ORIENTATIONS[name], lambda a: a)
    want = np.ascontiguousarray(turn(upright))
    for got in (decode_image(case_bytes[name]), native.decode_bytes(case_bytes[name])):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= (1 if name.endswith(".jpg") else 0)


def _plain_bytes(name: str) -> bytes:
    """The case's pixels with no metadata at all (JPEG: same encoder settings)."""
    if name.startswith("mpo_"):
        return decode_cases.mpo_jpeg()
    buf = io.BytesIO()
    if name.endswith(".jpg"):
        decode_cases._odd_rgb().save(buf, "JPEG", quality=90)
    else:
        decode_cases._odd_rgb().save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["mpo_frame0.jpg", "mpo_exif6.jpg", "progressive.jpg", "scans_500.jpg",
                                  "sos_pairs_in_app_segment.jpg"])
def test_mpo_and_progressive_are_bit_identical_to_pil_in_both(native, case_bytes, name):
    """libjpeg-turbo in both readers, RGB output: no tolerance. An MPO is frame 0 (PIL's first frame)."""
    with Image.open(io.BytesIO(case_bytes[name])) as img:
        assert img.format == ("MPO" if name.startswith("mpo_") else "JPEG")
        img.seek(0)
        img.load()
        turn = ORIENT.get(img.getexif().get(0x0112, 1), lambda a: a)
        want = np.ascontiguousarray(turn(np.asarray(img.convert("RGB"))))
    assert np.array_equal(decode_image(case_bytes[name]), want)
    assert np.array_equal(native.decode_bytes(case_bytes[name], name), want)


@pytest.mark.parametrize("scans", [MAX_JPEG_SCANS + 1, 3000])
def test_a_jpeg_with_too_many_scans_is_refused_by_both(native, scans):
    data = decode_cases.many_scans_jpeg(scans)
    assert data.count(b"\xff\xda") == scans
    with pytest.raises(ImageDecodeError, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(data, name="scans.jpg")
    with pytest.raises(native.NativeError, match=f"scans.jpg: .*more than {MAX_JPEG_SCANS} scans"):
        native.decode_bytes(data, "scans.jpg")


def test_the_scan_count_is_a_marker_walk():
    """FF DA pairs inside a segment are not scans; a scan ends at the next real marker (stuffed
    FF 00, fill bytes and RSTn are not markers); counting stops at the first EOI (MPO's frame 1)."""
    assert not jpeg_scans_exceed(decode_cases.sos_pairs_in_app_segment_jpeg())
    data = decode_cases.many_scans_jpeg(40)
    assert jpeg_scans_exceed(data, 39) and not jpeg_scans_exceed(data, 40)
    body = data[:-2]
    # fill bytes before a marker and a stuffed FF 00 inside a scan do not change the count
    filled = body.replace(b"\xff\xda", b"\xff\xff\xff\xda") + b"\xff\xd9"
    assert jpeg_scans_exceed(filled, 39) and not jpeg_scans_exceed(filled, 40)
    # a second frame after the first EOI (MPO) is not counted
    two_frames = data + data
    assert not jpeg_scans_exceed(two_frames, 40) and two_frames.count(b"\xff\xda") == 80
