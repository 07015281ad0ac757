"""TTA merge formulas, views, and `python -m trainer predict` (CSV rows, unreadable images, list files)."""
import csv
import shutil

import numpy as np
import pytest
import torch

from extras_support import cli, tiny_checkpoint
from trainer.inference import model_from_checkpoint
from trainer.data import Normalize, decode_image, eval_transform
from trainer.data.transforms import PreprocessSpec
from trainer.predict import image_ids, list_images, predict_paths
from trainer.tta import TTAError, TTAView, apply_views, merge_probs, parse_policy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_digits):
    return tiny_checkpoint(tmp_path_factory, tiny_digits)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_merge_formulas():
    p = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]],
                      [[0.1, 0.5, 0.4], [0.3, 0.4, 0.3]],
                      [[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]])  # (V=3, N=2, K=3)
    torch.testing.assert_close(merge_probs(p, "mean"), p.sum(0) / 3)
    mx = torch.tensor([[0.6, 0.5, 0.4], [0.3, 0.4, 0.8]])
    torch.testing.assert_close(merge_probs(p, "max"), mx / mx.sum(1, keepdim=True))
    # top-1 per view: sample 0 -> 0, 1, 0 ; sample 1 -> 2, 1, 2
    torch.testing.assert_close(merge_probs(p, "vote"), torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]]))
    # a 1-1 tie between classes 2 and 0 goes to the lowest index through argmax
    tie = torch.tensor([[[0.1, 0.0, 0.9]], [[0.9, 0.1, 0.0]]])
    assert int(merge_probs(tie, "vote").argmax(1)) == 0
    with pytest.raises(TTAError, match="unknown TTA merge"):
        merge_probs(p, "median")


def test_policies_and_views():
    assert [v.flip for v in parse_policy("hvflip")] == ["none", "h", "v", "hv"]
    assert len(parse_policy("ten-crop")) == 10
    assert [v.resize for v in parse_policy("multiscale:32,40")] == [32, 40]
    with pytest.raises(TTAError, match="unknown TTA policy"):
        parse_policy("rotate")
    spec = PreprocessSpec.for_size(4, crop_pct=0.8)  # resize 5, crop 4
    img = torch.arange(75, dtype=torch.uint8).view(3, 5, 5)
    views = apply_views(img, spec, [TTAView(), TTAView(flip="h"), TTAView(crop="bottom_right"), TTAView(flip="v")])
    center = eval_transform(img, spec)
    assert torch.equal(views[0], center)
    assert torch.equal(views[1], center.flip(-1))
    assert torch.equal(views[2], img[:, 1:, 1:])
    assert torch.equal(views[3], center.flip(-2))


def test_tta_changes_predictions_on_digits(ckpt, tiny_digits):
    """hflip TTA = the mean of the plain and the mirrored view's probabilities, and it changes the output."""
    loaded = model_from_checkpoint(ckpt)
    paths = sorted(str(p) for p in (tiny_digits / "val").rglob("*.png"))
    plain, _ = predict_paths(loaded.model, loaded.preprocess, paths, parse_policy("none"), progress=False)
    tta, errs = predict_paths(loaded.model, loaded.preprocess, paths, parse_policy("hflip"), progress=False)
    assert not any(errs)
    # reference: run the mirrored images through the model by hand
    norm = Normalize(loaded.preprocess.mean, loaded.preprocess.std)
    x = torch.stack([eval_transform(decode_image(p), loaded.preprocess) for p in paths])
    with torch.no_grad():
        p0 = torch.softmax(loaded.model(norm(x)), 1).numpy()
        p1 = torch.softmax(loaded.model(norm(x.flip(-1))), 1).numpy()
    np.testing.assert_allclose(plain, p0, atol=1e-5)
    np.testing.assert_allclose(tta, (p0 + p1) / 2, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-3  # digits are not mirror-symmetric: TTA moves the probabilities


def test_predict_cli_writes_a_row_per_image_with_errors(ckpt, tiny_digits, tmp_path, capsys, caplog):
    imgs = tmp_path / "imgs"
    shutil.copytree(tiny_digits / "val" / "7", imgs / "a")
    (imgs / "b").mkdir()
    shutil.copy(next((tiny_digits / "val" / "0").glob("*.png")), imgs / "b" / "zero.png")
    (imgs / "broken.png").write_bytes(b"not a png")
    (imgs / "cut.png").write_bytes((imgs / "b" / "zero.png").read_bytes()[:40])
    out = tmp_path / "preds.csv"
    assert cli("predict", "--checkpoint", ckpt, "--images", imgs, "--out", out, "--tta", "five-crop",
               "--topk", "2", "--save-probs", "--workers", "0", "--batch-size", "3") == 0
    assert "unreadable image" in caplog.text and "2 unreadable" in capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == 8 + 1 + 2
    assert list(rows[0]) == ["id", "label", "prob", "top2_label", "top2_prob", "prob_0", "prob_1", "prob_7", "error"]
    bad = {r["id"]: r for r in rows if r["error"]}
    assert set(bad) == {"broken", "cut"} and all(r["label"] == "" for r in bad.values())
    good = [r for r in rows if not r["error"]]
    for r in good:
        probs = [float(r[f"prob_{c}"]) for c in ("0", "1", "7")]
        assert abs(sum(probs) - 1) < 1e-4
        assert float(r["prob"]) == pytest.approx(max(probs), abs=1e-6) and float(r["top2_prob"]) <= float(r["prob"])
    assert sum(r["label"] == "7" for r in good if r["id"] != "zero") >= 5  # a trained model, not noise


def test_list_files_ids_and_bad_policy(ckpt, tiny_digits, tmp_path, capsys):
    a = next((tiny_digits / "val" / "1").glob("*.png"))
    lst = tmp_path / "list.txt"
    lst.write_text(f"# images\n{a} 1\n{tmp_path / 'missing.png'}\n")
    paths = list_images(lst)
    assert paths == [str(a), str(tmp_path / "missing.png")]
    out = tmp_path / "p.csv"
    assert cli("predict", "--checkpoint", ckpt, "--images", lst, "--out", out, "--workers", "0") == 0
    rows = read_csv(out)
    assert [r["id"] for r in rows] == [a.stem, "missing"] and "cannot open" in rows[1]["error"]
    assert image_ids(["x/a/img.png", "x/b/img.png", "x/c.png"]) == ["a/img", "b/img", "c"]
    assert cli("predict", "--checkpoint", ckpt, "--images", lst, "--out", out, "--tta", "spin") == 2
    assert "unknown TTA policy 'spin'" in capsys.readouterr().err
    assert cli("predict", "--checkpoint", ckpt, "--images", tmp_path / "nowhere", "--out", out) == 2
    assert "no such folder or list file" in capsys.readouterr().err
