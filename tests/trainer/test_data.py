import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from trainer.data import DataError, ImageDecodeError, PreprocessSpec, decode_image, discover_dataset, eval_transform
from trainer.data.demo import write_digits_dataset
from trainer.data.images import (_BAND_PIXELS, IMAGE_FORMATS, _to_rgb_array, find_bad_images, format_refusal,
                                 grey16_to_uint8)
from trainer.data.layout import stratified_split
from trainer.data.prepare import prepare_lists


# ---- layouts

def test_train_val_folders(tiny_digits):
    s = discover_dataset(tiny_digits)
    assert s.classes == ["0", "1", "7"]
    assert len(s.train) == 72 and len(s.val) == 24
    assert s.layout == "train/val folders"
    assert {lbl for _, lbl in s.val} == {0, 1, 2}


def test_class_folders_with_val_fraction_is_stratified_and_seeded(tiny_digits):
    root = tiny_digits / "train"
    a = discover_dataset(root, val_fraction=0.25, seed=3)
    b = discover_dataset(root, val_fraction=0.25, seed=3)
    c = discover_dataset(root, val_fraction=0.25, seed=4)
    assert a.val == b.val and a.val != c.val
    counts = np.bincount([lbl for _, lbl in a.val])
    assert counts.tolist() == [6, 6, 6]
    assert not set(a.train) & set(a.val)


def test_class_folders_without_fraction_explains_fix(tiny_digits):
    with pytest.raises(DataError, match="--val-fraction"):
        discover_dataset(tiny_digits / "train")


def test_list_files_seed_format(tiny_digits, tmp_path):
    # the seed project's format: absolute path, a space, an integer label
    rows = []
    for i, c in enumerate(["0", "1", "7"]):
        rows += [f"{p} {i}" for p in sorted((tiny_digits / "train" / c).glob("*.png"))]
    (tmp_path / "train.txt").write_text("\n".join(rows) + "\n")
    vrows = []
    for i, c in enumerate(["0", "1", "7"]):
        vrows += [f"{p}\t{i}" for p in sorted((tiny_digits / "val" / c).glob("*.png"))]
    (tmp_path / "val.txt").write_text("\n".join(vrows) + "\n")
    s = discover_dataset(tmp_path)
    assert s.layout == "list files" and s.classes == ["0", "1", "2"]
    assert len(s.train) == 72 and len(s.val) == 24
    (tmp_path / "classes.json").write_text(json.dumps(["zero", "one", "seven"]))
    assert discover_dataset(tmp_path).classes == ["zero", "one", "seven"]


def test_list_file_with_spaces_in_paths_and_relative_paths(tmp_path):
    for i, c in enumerate(["a b", "c"]):
        for j in range(3):
            write_image(tmp_path / "imgs" / c / f"im {j}.png")
    (tmp_path / "train.txt").write_text("".join(f"imgs/{c}/im {j}.png {i}\n" for i, c in enumerate(["a b", "c"])
                                                for j in range(3)))
    s = discover_dataset(tmp_path, val_fraction=0.34)
    assert len(s.train) + len(s.val) == 6
    assert all(p.startswith(str(tmp_path)) for p, _ in s.train)


def test_prepare_writes_lists_and_classes(tiny_digits, tmp_path):
    info = prepare_lists(tiny_digits / "train", tmp_path / "lists", val_fraction=0.25, seed=0)
    assert info["classes"] == ["0", "1", "7"]
    assert json.loads((tmp_path / "lists" / "classes.json").read_text()) == ["0", "1", "7"]
    s = discover_dataset(tmp_path / "lists")
    assert s.classes == ["0", "1", "7"] and len(s.train) == 54 and len(s.val) == 18
    again = prepare_lists(tiny_digits / "train", tmp_path / "lists2", val_fraction=0.25, seed=0)
    assert (tmp_path / "lists" / "val.txt").read_text() == (tmp_path / "lists2" / "val.txt").read_text()
    assert again["val"] == 18


def test_class_order_is_sorted(tmp_path):
    for c in ["zebra", "apple", "Mango"]:
        for split in ("train", "val"):
            write_image(tmp_path / split / c / "x.png")
    assert discover_dataset(tmp_path).classes == ["Mango", "apple", "zebra"]


# ---- bad layouts

def test_missing_root_suggests_demo(tmp_path):
    with pytest.raises(DataError, match="demo-data"):
        discover_dataset(tmp_path / "nope")


def test_empty_class_folder(tiny_copy):
    (tiny_copy / "train" / "9").mkdir()
    with pytest.raises(DataError, match=r"no images: '.*/train/9'"):
        discover_dataset(tiny_copy)


def test_single_class(tmp_path):
    for split in ("train", "val"):
        write_image(tmp_path / split / "only" / "a.png")
    with pytest.raises(DataError, match="single class"):
        discover_dataset(tmp_path)


def test_val_class_missing_from_training(tiny_copy):
    shutil.copytree(tiny_copy / "val" / "7", tiny_copy / "val" / "8")
    with pytest.raises(DataError, match=r"\['8'\].*have no folder"):
        discover_dataset(tiny_copy)


def test_loose_images_without_class_folders(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(DataError, match="no class sub-folders.*loose image"):
        discover_dataset(tmp_path, val_fraction=0.2)


def test_list_file_pointing_at_missing_files(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text("a.png 0\nmissing1.png 1\n/abs/missing2.png 1\n")
    with pytest.raises(DataError, match=r"2 listed file\(s\) do not exist(.|\n)*missing1.png(.|\n)*line 3"):
        discover_dataset(tmp_path, val_fraction=0.5)


def test_list_file_malformed_label(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text("a.png cat\n")
    with pytest.raises(DataError, match="neither an integer nor a class name"):
        discover_dataset(tmp_path, val_fraction=0.5)


def test_unlabelled_val_list_needs_fraction(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png")
    (tmp_path / "train.txt").write_text("0.png 0\n1.png 0\n2.png 1\n3.png 1\n")
    (tmp_path / "val.txt").write_text("0.png\n")
    with pytest.raises(DataError, match="without labels"):
        discover_dataset(tmp_path)
    assert len(discover_dataset(tmp_path, val_fraction=0.5).val) == 2


def test_stratified_split_keeps_one_of_each_in_train():
    tr, va = stratified_split([0, 0, 1, 1, 1, 2], 0.5, seed=0)
    assert sorted(tr + va) == list(range(6))
    assert {0, 1, 2} <= {[0, 0, 1, 1, 1, 2][i] for i in tr}


# ---- decoding real-world files

@pytest.mark.parametrize("mode,fmt,ext", [
    ("RGB", "JPEG", "jpg"), ("RGB", "PNG", "png"), ("RGB", "BMP", "bmp"), ("RGB", "WEBP", "webp"),
    ("P", "GIF", "gif"), ("L", "PNG", "png"), ("P", "PNG", "png"), ("RGBA", "PNG", "png"), ("LA", "PNG", "png"),
    ("CMYK", "JPEG", "jpg"), ("I;16", "PNG", "png"), ("1", "PNG", "png"), ("L", "TIFF", "tif"),
])
def test_every_mode_decodes_to_rgb_uint8(tmp_path, mode, fmt, ext):
    p = write_image(tmp_path / f"img.{ext}", mode=mode, fmt=fmt)
    arr = decode_image(p)
    assert arr.dtype == np.uint8 and arr.shape == (16, 20, 3)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    img.save(tmp_path / "w.png")
    assert decode_image(tmp_path / "w.png").min() == 255
    Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)).save(tmp_path / "g.png")
    assert (decode_image(tmp_path / "g.png") == 100).all()


def _float_formula(v: np.ndarray) -> np.ndarray:
    """The conversion before issue 20 (through float64): round(v / 257), clipped."""
    return np.clip(np.rint(v.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def test_sixteen_bit_integer_conversion_equals_the_float_formula_for_every_value():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = _to_rgb_array(Image.fromarray(every))   # mode I;16
    assert got.shape == (256, 256, 3) and got.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(got[:, :, c], _float_formula(every))
    # 32-bit "I" beyond 16 bits (a TIFF): clipped at both ends as the float formula clipped
    wide = np.array([[-70000, -129, -1, 0, 128, 129, 65535, 65536, 70000, 2**31 - 1]], dtype=np.int32)
    img = Image.fromarray(wide)
    assert img.mode == "I"
    assert np.array_equal(_to_rgb_array(img)[:, :, 0], _float_formula(wide))
    assert np.array_equal(grey16_to_uint8(every.astype(np.int64)), _float_formula(every))


def test_sixteen_bit_conversion_makes_no_full_size_temporary():
    """A 4 MP 16-bit grey image: the result (3 bytes a pixel) plus bands of rows, never a full-size
    copy (through float64 it took about 30 bytes a pixel: 1 GB for 40 MP)."""
    import tracemalloc

    img = Image.fromarray(np.arange(2000 * 2000, dtype=np.uint32).reshape(2000, 2000).astype(np.uint16))
    tracemalloc.start()
    try:
        out = _to_rgb_array(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.nbytes == 12_000_000
    assert peak < out.nbytes + 16 * _BAND_PIXELS, f"peak {peak / 1e6:.1f} MB for a {out.nbytes / 1e6:.0f} MB result"


def test_mpo_is_decoded_as_its_first_frame_and_other_formats_are_refused(tmp_path):
    from native.decode_cases import mpo_jpeg
    from trainer.data.index import read_header

    (tmp_path / "phone.jpg").write_bytes(mpo_jpeg())
    with Image.open(tmp_path / "phone.jpg") as img:
        assert img.format == "MPO" and img.n_frames == 2
        first = np.asarray(img.convert("RGB"))
    assert np.array_equal(decode_image(tmp_path / "phone.jpg"), first)
    assert read_header(str(tmp_path / "phone.jpg")) == (52, 36, None)   # (width, height)
    # a PPM named .png: PIL reads it, but it is outside the one list training and the server accept
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "odd.png", format="PPM")
    with pytest.raises(ImageDecodeError, match="format PPM is not accepted; use one of JPEG, MPO, PNG"):
        decode_image(tmp_path / "odd.png")
    assert read_header(str(tmp_path / "odd.png")) == (0, 0, format_refusal(str(tmp_path / "odd.png"), "PPM"))
    assert "PPM" not in IMAGE_FORMATS


def test_alpha_is_dropped_not_composited(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 0  # fully transparent red stays red
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    assert (decode_image(tmp_path / "a.png")[..., 0] == 200).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8))  # 30 wide, 10 high
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert decode_image(tmp_path / "r.jpg").shape == (30, 10, 3)


def test_corrupt_truncated_and_non_images_name_the_file(tmp_path):
    good = write_image(tmp_path / "good.jpg", fmt="JPEG", size=(64, 64))
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("trunc.jpg", "text.png", "empty.png"):
        with pytest.raises(ImageDecodeError, match=name):
            decode_image(tmp_path / name)
    bad = find_bad_images([str(tmp_path / n) for n in ("good.jpg", "trunc.jpg", "text.png", "empty.png")])
    assert len(bad) == 3 and not any("good.jpg" in b for b in bad)


def _photo(w=61, h=43, seed=0) -> Image.Image:
    """Smooth colour structure plus noise: every IDCT and upsampling difference would show."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8))
    arr = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(int) + rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _pil_reference(data: bytes) -> np.ndarray:
    import io
    from PIL import ImageOps
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("variant", [
    dict(subsampling=0), dict(subsampling=1), dict(subsampling=2), dict(subsampling=2, progressive=True),
    dict(subsampling=2, quality=40, optimize=True), dict(mode="L"), dict(subsampling=2, size=(1, 1)),
    *[dict(subsampling=2, orientation=o) for o in range(1, 9)],
])
def test_jpeg_fast_path_gives_the_same_pixels_as_pil(variant):
    """decode_image's simplejpeg path: identical to PIL + exif_transpose for every subsampling,
    progressive, grayscale and all eight EXIF orientations (and actually taken for them)."""
    import io
    from trainer.data import images
    if images.simplejpeg is None:
        pytest.skip("simplejpeg not installed (a dependency; PIL alone is the reference)")
    v = dict(variant)
    img = _photo(*v.pop("size", (61, 43)))
    if v.pop("mode", "RGB") == "L":
        img = img.convert("L")
    orientation = v.pop("orientation", None)
    if orientation:
        exif = img.getexif()
        exif[0x0112] = orientation
        v["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=v.pop("quality", 90), **v)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as header:
        assert images._decode_jpeg_fast(header, data) is not None   # the fast path is the one tested
    got, want = decode_image(data), _pil_reference(data)
    assert got.shape == want.shape and got.flags.c_contiguous and got.flags.writeable
    assert np.array_equal(got, want)


def test_decode_from_bytes_equals_file(tmp_path):
    p = write_image(tmp_path / "x.png")
    assert np.array_equal(decode_image(p.read_bytes()), decode_image(p))


# ---- transforms

def test_eval_transform_resizes_shorter_side_and_center_crops():
    spec = PreprocessSpec.for_size(32, crop_pct=0.875)
    assert spec.resize_size == 36
    img = np.random.default_rng(0).integers(0, 255, (50, 100, 3), dtype=np.uint8)
    out = eval_transform(img, spec)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    # the default: torch's antialiased kernel straight on uint8
    import torch.nn.functional as F
    chw = torch.from_numpy(img).permute(2, 0, 1)[None]
    ref = F.interpolate(chw, size=(36, 72), mode="bilinear", antialias=True, align_corners=False)[0]
    assert spec.resize_kernel == "uint8" and torch.equal(out, ref[:, 2:34, 20:52])
    # resize_kernel float32 (specs written before the field): computed in float, then rounded
    old = PreprocessSpec.for_size(32, crop_pct=0.875)
    old.resize_kernel = "float32"
    ref32 = F.interpolate(chw.float(), size=(36, 72), mode="bilinear", antialias=True,
                          align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
    assert torch.equal(eval_transform(img, old), ref32[:, 2:34, 20:52])


def test_preprocess_spec_round_trips_as_plain_data():
    spec = PreprocessSpec.for_size(224, 0.875, "bicubic")
    d = json.loads(json.dumps(spec.to_dict()))
    assert PreprocessSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_dict({**d, "gamma": 2.2})


def test_demo_data_is_idempotent_and_complete(tmp_path):
    info = write_digits_dataset(tmp_path / "d")
    assert info["train"] + info["val"] == 1797
    mtime = (tmp_path / "d" / "dataset.json").stat().st_mtime_ns
    write_digits_dataset(tmp_path / "d")
    assert (tmp_path / "d" / "dataset.json").stat().st_mtime_ns == mtime
    s = discover_dataset(tmp_path / "d")
    assert s.classes == [str(i) for i in range(10)]
    assert decode_image(s.train[0][0]).shape == (32, 32, 3)
