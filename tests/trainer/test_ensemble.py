"""CSV ensembling (mean, weighted, vote; seed-style id,label files) and model-level ensemble evaluation."""
import csv
import json

import numpy as np
import pytest

from extras_support import cli, perturbed_copy, tiny_checkpoint
from trainer.ensemble import EnsembleError, ensemble_files, fuse_probs, read_predictions


def write_probs(path, rows, classes=("a", "b", "c")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "prob"] + [f"prob_{c}" for c in classes] + ["error"])
        for ident, p in rows:
            j = int(np.argmax(p))
            w.writerow([ident, classes[j], p[j]] + list(p) + [""])
    return str(path)


def write_votes(path, rows, header=False):
    text = ("id,label\n" if header else "") + "".join(f"{i},{lbl}\n" for i, lbl in rows)
    path.write_text(text)
    return str(path)


def test_fuse_formulas():
    p1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    p2 = np.array([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    p3 = np.array([[0.1, 0.8, 0.1], [0.0, 0.1, 0.9]])
    np.testing.assert_allclose(fuse_probs([p1, p2, p3], "mean"), (p1 + p2 + p3) / 3, atol=1e-6)
    np.testing.assert_allclose(fuse_probs([p1, p2, p3], "weighted", [2, 1, 1]), (2 * p1 + p2 + p3) / 4, atol=1e-6)
    # votes: sample 0 -> a, b, b ; sample 1 -> b, c, c. Weighted 3:1:1 -> a 0.6 / b 0.4 and b 0.6 / c 0.4
    np.testing.assert_allclose(fuse_probs([p1, p2, p3], "vote"), [[1 / 3, 2 / 3, 0], [0, 1 / 3, 2 / 3]], atol=1e-6)
    np.testing.assert_allclose(fuse_probs([p1, p2, p3], "vote", [3, 1, 1]), [[0.6, 0.4, 0], [0, 0.6, 0.4]], atol=1e-6)
    tie = fuse_probs([p2, p1], "vote")  # sample 0: b vs a tie -> lowest index a, whatever the input order
    assert tie[0].argmax() == 0 and fuse_probs([p1, p2], "vote")[0].argmax() == 0
    with pytest.raises(EnsembleError, match="one weight per input"):
        fuse_probs([p1, p2], "weighted", [1.0])


def test_probability_csvs_are_aligned_by_id_not_by_line(tmp_path):
    a = write_probs(tmp_path / "a.csv", [("x", [0.6, 0.3, 0.1]), ("y", [0.2, 0.2, 0.6]), ("z", [0.3, 0.4, 0.3])])
    b = write_probs(tmp_path / "b.csv", [("z", [0.1, 0.1, 0.8]), ("x", [0.2, 0.7, 0.1]), ("y", [0.5, 0.4, 0.1])])
    table, info = ensemble_files([a, b], "weighted", [3, 1])
    assert table.ids == ["x", "y", "z"] and info["fusion"] == "weighted"
    np.testing.assert_allclose(table.probs[0], [0.75 * 0.6 + 0.25 * 0.2, 0.75 * 0.3 + 0.25 * 0.7, 0.1], atol=1e-6)
    np.testing.assert_allclose(table.probs[2], [0.25, 0.325, 0.425], atol=1e-6)


def test_seed_vote_files_header_weights_and_ties(tmp_path):
    rows1 = [("1", "cat"), ("2", "dog"), ("3", "dog"), ("4", "cat")]
    rows2 = [("2", "dog"), ("1", "dog"), ("4", "dog"), ("3", "bird")]
    rows3 = [("3", "bird"), ("1", "dog"), ("2", "cat"), ("4", "bird")]
    f1 = write_votes(tmp_path / "m1.csv", rows1)
    f2 = write_votes(tmp_path / "m2.csv", rows2, header=True)  # a header line is recognised, not voted
    f3 = write_votes(tmp_path / "m3.csv", rows3)
    assert read_predictions(f2).ids == ["2", "1", "4", "3"]
    table, info = ensemble_files([f1, f2, f3], "vote")
    labels = [table.classes[int(np.argmax(p))] for p in table.probs]
    # id 4 is a 1-1-1 tie between cat, dog, bird: the lowest class in sorted order (bird) wins, every time
    assert table.ids == ["1", "2", "3", "4"] and labels == ["dog", "dog", "bird", "bird"]
    assert info["classes"] == ["bird", "cat", "dog"]
    # weighted vote (kaggle_vote.py's weights, via --weights or _wN file names)
    table, _ = ensemble_files([f1, f2, f3], "weighted", [3, 1, 1])
    assert [table.classes[int(np.argmax(p))] for p in table.probs] == ["cat", "dog", "dog", "cat"]
    for i, f in enumerate((f1, f2, f3)):
        (tmp_path / f"m{i}_w{[3, 1, 1][i]}.csv").write_text(open(f).read())
    named, info = ensemble_files([str(tmp_path / "m*_w*.csv")], "weighted")
    assert info["weights"] == pytest.approx([0.6, 0.2, 0.2])
    np.testing.assert_allclose(named.probs, table.probs)


def test_bad_inputs_are_reported(tmp_path, capsys):
    a = write_probs(tmp_path / "a.csv", [("x", [0.6, 0.3, 0.1]), ("y", [0.2, 0.2, 0.6])])
    b = write_probs(tmp_path / "b.csv", [("x", [0.6, 0.3, 0.1]), ("q", [0.2, 0.2, 0.6])])
    with pytest.raises(EnsembleError, match=r"(?s)a.csv lacks 1 id\(s\), e.g. \['q'\].*b.csv lacks 1 id\(s\), e.g. \['y'\]"):
        ensemble_files([a, b])
    table, _ = ensemble_files([a, b], on_mismatch="intersect")
    assert table.ids == ["x"]
    c = write_probs(tmp_path / "c.csv", [("x", [0.6, 0.4]), ("y", [0.2, 0.8])], classes=("a", "z"))
    with pytest.raises(EnsembleError, match="class columns differ"):
        ensemble_files([a, c])
    v = write_votes(tmp_path / "v.csv", [("x", "a"), ("y", "b")])
    with pytest.raises(EnsembleError, match="hold labels only"):
        ensemble_files([a, v], "mean")
    dup = write_votes(tmp_path / "d.csv", [("x", "a"), ("x", "b")])
    with pytest.raises(EnsembleError, match="duplicate id"):
        ensemble_files([v, dup], "vote")
    three = tmp_path / "t.csv"
    three.write_text("x,a,0.5\n")
    with pytest.raises(EnsembleError, match="exactly two columns"):
        read_predictions(three)
    assert cli("ensemble", "--inputs", a, "--out", tmp_path / "o.csv") == 2
    assert "at least two inputs" in capsys.readouterr().err
    assert cli("ensemble", "--inputs", a, b, "--out", tmp_path / "o.csv", "--method", "weighted",
               "--weights", "1,2,3") == 2
    assert "3 weight(s) given for 2 input(s)" in capsys.readouterr().err
    assert cli("ensemble", "--inputs", a, b, "--out", tmp_path / "o.csv", "--on-mismatch", "intersect") == 0
    with open(tmp_path / "o.csv") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == ["x"]


def test_evaluate_ensemble_of_checkpoints_reports_members_and_gain(tmp_path_factory, tiny_digits, tmp_path, capsys):
    a = tiny_checkpoint(tmp_path_factory, tiny_digits)
    b = perturbed_copy(a, tmp_path / "b.pt", scale=0.3)
    assert cli("evaluate", "--checkpoint", a, b, "--weights", "0.7,0.3", "--tta", "hflip", "--data", tiny_digits,
               "--workers", "0", "--json", "--out", tmp_path / "rep") == 0
    rep = json.loads(capsys.readouterr().out)
    assert [m["checkpoint"] for m in rep["members"]] == [str(a), str(b)]
    assert rep["fusion"] == "weighted" and rep["ensemble_weights"] == [0.7, 0.3] and rep["tta"] == "hflip"
    best = max(m["top1"] for m in rep["members"])
    assert rep["gain_over_best_member"] == pytest.approx(rep["top1"] - best)
    assert (tmp_path / "rep" / "report.json").is_file()
    # a member on its own, through the same path, reproduces its member figure
    assert cli("evaluate", "--checkpoint", b, "--tta", "hflip", "--data", tiny_digits, "--workers", "0", "--json") == 0
    assert json.loads(capsys.readouterr().out)["top1"] == rep["members"][1]["top1"]
    assert cli("evaluate", "--checkpoint", a, b, "--weights", "1", "--data", tiny_digits) == 2
    assert "1 weight(s) given for 2 input(s)" in capsys.readouterr().err
