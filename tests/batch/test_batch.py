"""python -m batch on one machine: rows against the loader's own predict, every input kind, error rows,
the output folder's rules, and exactly-once output after a SIGKILL and a resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from batch import BatchOptions, read_output, run_batch
from batch.cli import main as batch_main
from batch.inputs import InputError, list_inputs
from batch.output import JOB_FILE, OutputError, OutputFolder
from batch.progress import Progress
from batch_fixtures import ensemble_bundle, hflip_bundle, image_tree, manifest_sha256  # noqa: F401
from conftest import REPO
from export import load_bundle


def rows_by_path(out) -> dict[str, dict]:
    rows = read_output(out).to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "a path is in the output more than once"
    return by_path


def check_against_loader(bundle_path, rows: dict[str, dict], topk: int) -> None:
    """Every readable image's row equals export.load_bundle(...).predict on that file."""
    good = sorted(p for p, r in rows.items() if r["error"] is None)
    ref = load_bundle(bundle_path, backend="torchscript").predict(good, topk=topk)
    for i, path in enumerate(good):
        assert rows[path]["topk_labels"] == ref.labels[i]
        assert rows[path]["label"] == ref.labels[i][0]
        np.testing.assert_allclose(rows[path]["topk_probs"], ref.scores[i], rtol=0, atol=1e-5)
        if "probs" in rows[path]:
            np.testing.assert_allclose(rows[path]["probs"], ref.probs[i], rtol=0, atol=1e-5)


def test_folder_rows_match_the_loader_and_parts_are_atomic(hflip_bundle, image_tree, tmp_path):
    out = tmp_path / "out"
    summary = run_batch(BatchOptions(bundle=str(hflip_bundle), images=str(image_tree), out=str(out),
                                     backend="torchscript", topk=2, save_probs=True, batch_size=4, workers=2,
                                     part_size=8, progress=False))
    inputs = sorted(str(p) for p in image_tree.rglob("*") if p.is_file())
    assert (summary.total, summary.written, summary.errors, summary.parts) == (25, 25, 1, 4)  # 8 + 8 + 8 + 1
    rows = rows_by_path(out)
    assert sorted(rows) == inputs
    check_against_loader(hflip_bundle, rows, topk=2)
    bad = rows[str(image_tree / "7" / "broken.png")]
    assert "broken.png" in bad["error"] and "unreadable" in bad["error"]
    assert bad["label"] is None and bad["topk_labels"] is None and bad["probs"] is None
    manifest = json.loads((hflip_bundle / "manifest.json").read_text())
    for r in rows.values():
        assert (r["bundle_name"], r["bundle_version"], r["bundle_sha256"]) == \
            (manifest["name"], manifest["version"], manifest_sha256(hflip_bundle))
    schema = pq.read_schema(sorted(out.glob("part-*.parquet"))[0])
    assert json.loads(schema.metadata[b"shipclassifier.classes"]) == manifest["classes"]
    assert schema.field("topk_probs").type == pa.list_(pa.float32())
    # the whole folder reads as one dataset: the job file, the lock and temporaries are not parts
    assert pq.read_table(out).num_rows == 25
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_ensemble_rows_match_the_loader(ensemble_bundle, image_tree, tmp_path):
    out = tmp_path / "out"
    run_batch(BatchOptions(bundle=str(ensemble_bundle), images=str(image_tree), out=str(out), backend="torchscript",
                           topk=3, save_probs=True, batch_size=5, workers=1, progress=False))
    rows = rows_by_path(out)
    assert len(rows) == 25
    check_against_loader(ensemble_bundle, rows, topk=3)


def test_every_input_kind_gives_the_same_rows(hflip_bundle, image_tree, tmp_path):
    files = sorted(str(p.relative_to(image_tree)) for p in image_tree.rglob("*") if p.is_file())
    # list file: relative to its folder, one duplicate, one missing file, a comment and train.txt-style labels
    listing = image_tree / "list.txt"
    listing.write_text("# photos\n" + "\n".join(f"{f} 3" for f in files) + f"\n{files[0]}\nmissing.png\n")
    table = pa.table({"id": list(range(len(files) + 2)), "file": files + [None, "missing.png"]})
    pq.write_table(table, image_tree / "index.parquet")
    pacsv.write_csv(table, image_tree / "index.csv")
    try:
        listed = list_inputs(listing)
        assert listed.repeated == 1 and len(listed.paths) == len(files) + 1
        assert list_inputs(image_tree / "index.parquet", "file").blank_rows == [len(files)]
        results = {}
        for name, images, column in (("folder", image_tree, "path"), ("list", listing, "path"),
                                     ("parquet", image_tree / "index.parquet", "file"),
                                     ("csv", image_tree / "index.csv", "file")):
            out = tmp_path / name
            run_batch(BatchOptions(bundle=str(hflip_bundle), images=str(images), column=column, out=str(out),
                                   backend="torchscript", batch_size=8, workers=1, progress=False))
            results[name] = {os.path.relpath(p, image_tree): (r["topk_labels"], r["error"] is None)
                             for p, r in rows_by_path(out).items()}
    finally:
        for f in ("list.txt", "index.parquet", "index.csv"):
            (image_tree / f).unlink()
    assert set(results["folder"]) == set(files)
    for name in ("list", "parquet", "csv"):
        missing = results[name].pop("missing.png")
        assert missing == (None, False)  # an error row, not a drop
        assert results[name] == results["folder"], name
    with pytest.raises(InputError, match=r"no column 'path' \(it has: id, file\)"):
        pq.write_table(table, tmp_path / "t.parquet")
        list_inputs(tmp_path / "t.parquet")
    with pytest.raises(InputError, match="holds int64, not paths"):
        list_inputs(tmp_path / "t.parquet", "id")


def test_another_job_or_a_second_writer_is_refused(hflip_bundle, image_tree, tmp_path):
    out = tmp_path / "out"
    opts = dict(bundle=str(hflip_bundle), images=str(image_tree), out=str(out), backend="torchscript", workers=0,
                progress=False)
    run_batch(BatchOptions(**opts, topk=1))
    with pytest.raises(OutputError, match="another job .*differs in: topk"):
        run_batch(BatchOptions(**opts, topk=2))
    with pytest.raises(OutputError, match="differs in: tta"):
        run_batch(BatchOptions(**opts, topk=1, tta="none"))
    # a rerun of the same job has nothing to do and writes nothing
    again = run_batch(BatchOptions(**opts, topk=1))
    assert (again.skipped, again.written, again.parts) == (25, 0, 0)
    ident = json.loads((out / JOB_FILE).read_text())
    from batch.job import job_identity

    holder = OutputFolder(out, job_identity(BatchOptions(**opts, topk=1)))
    try:
        with pytest.raises(OutputError, match="another python -m batch job is writing"):
            run_batch(BatchOptions(**opts, topk=1))
    finally:
        holder.close()
    assert ident["topk"] == 1


KILLER = textwrap.dedent("""
    import os, signal, sys
    from batch import BatchOptions, run_batch

    def on_part(path, parts):
        if parts == int(sys.argv[4]):
            # a half-written next part, as a kill during a write leaves it
            with open(os.path.join(sys.argv[3], ".part-000099.parquet.tmp"), "wb") as fh:
                fh.write(b"PAR1 torn")
            os.kill(os.getpid(), signal.SIGKILL)

    run_batch(BatchOptions(bundle=sys.argv[1], images=sys.argv[2], out=sys.argv[3], backend="torchscript",
                           batch_size=3, part_size=6, workers=2, save_probs=True, progress=False), on_part=on_part)
""")


def test_killed_at_half_and_resumed_gives_exactly_the_uninterrupted_rows(hflip_bundle, image_tree, tmp_path):
    """SIGKILL right after the 2nd of 5 parts (12 of 25 rows), with a torn temporary part on disk; the same
    command again finishes the job: every input exactly once, the rows of an uninterrupted run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO)]))
    out = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", KILLER, str(hflip_bundle), str(image_tree), str(out), "2"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    assert read_output(out).num_rows == 12
    args = ["--bundle", str(hflip_bundle), "--images", str(image_tree), "--out", str(out), "--backend",
            "torchscript", "--batch-size", "3", "--part-size", "6", "--workers", "2", "--save-probs", "--quiet",
            "--json"]
    resumed = subprocess.run([sys.executable, "-m", "batch", *args], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (summary["skipped"], summary["written"], summary["parts"]) == (12, 13, 3)
    assert not list(out.glob(".*.tmp"))
    whole = tmp_path / "whole"
    run_batch(BatchOptions(bundle=str(hflip_bundle), images=str(image_tree), out=str(whole), backend="torchscript",
                           batch_size=3, part_size=6, workers=2, save_probs=True, progress=False))
    got, want = rows_by_path(out), rows_by_path(whole)
    assert sorted(got) == sorted(want) and len(got) == 25
    for path, row in want.items():
        for key in ("label", "topk_labels", "error", "bundle_sha256"):
            assert got[path][key] == row[key], (path, key)
        if row["error"] is None:
            np.testing.assert_allclose(got[path]["probs"], row["probs"], rtol=0, atol=1e-6)


def test_cli_errors_are_one_line_with_exit_2(hflip_bundle, tmp_path, capsys):
    code = batch_main(["--bundle", str(hflip_bundle), "--images", str(tmp_path / "nowhere"), "--out",
                       str(tmp_path / "out")])
    assert code == 2
    assert "error: --images" in capsys.readouterr().err
    code = batch_main(["--bundle", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "is not a bundle" in capsys.readouterr().err
    code = batch_main(["--bundle", str(hflip_bundle), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--part-size", "0"])
    assert code == 2
    assert "--part-size must be >= 1" in capsys.readouterr().err


def test_progress_lines_when_not_a_terminal(caplog):
    now = [0.0]
    progress = Progress(total=1000, done_before=200, tty=False, interval_s=10, clock=lambda: now[0])
    caplog.set_level("INFO", logger="batch")
    now[0] = 5.0
    progress.update(100)        # within the interval: no line
    now[0] = 20.0
    progress.update(300, errors=2)  # 400 new images in 20 s: 20/s, 400 left: 20 s
    assert [r.getMessage() for r in caplog.records] == [
        "batch: 600/1000 images (60.0%), 2 errors, 20.0 images/s, ETA 0:00:20"]
    progress.close()
    assert "400 classified by this run in 20.0 s (20.0 images/s)" in caplog.records[-1].getMessage()


def test_blank_lines_and_repeats_in_a_one_column_csv_are_counted(tmp_path):
    """A one-column CSV writes a null as an empty line, which a CSV reader skips by default: here it is
    a reported blank row, never a silent drop; a repeated path is one input."""
    table = tmp_path / "index.csv"
    pacsv.write_csv(pa.table({"path": ["a.png", None, "sub/b.png", "a.png"]}), table)
    listed = list_inputs(table)
    assert listed.paths == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")]
    assert (listed.repeated, listed.blank_rows) == (1, [1])
