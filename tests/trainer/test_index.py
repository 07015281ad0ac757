"""The header-only image index (cached by path, size and mtime) and `python -m trainer check-data`."""
import os

from extras_support import cli
from trainer.data.index import build_index, index_path


def _truncate(path, keep=2 / 3):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_index_reads_headers_once_and_rereads_only_changed_files(tiny_copy, monkeypatch, tmp_path):
    monkeypatch.setenv("SHIPCLASSIFIER_CACHE", str(tmp_path / "cache"))
    paths = sorted(str(p) for p in tiny_copy.rglob("*.png"))
    first = build_index(str(tiny_copy), paths)
    assert (first.read, first.reused) == (len(paths), 0) and not first.bad(paths)
    assert index_path(str(tiny_copy)).is_file()
    assert all(first.entries[p][0] > 0 and first.entries[p][1] > 0 for p in paths)
    again = build_index(str(tiny_copy), paths)
    assert (again.read, again.reused) == (0, len(paths))
    (tiny_copy / "train" / "0" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")   # a bad header
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    paths.append(str(tiny_copy / "train" / "0" / "x.png"))
    third = build_index(str(tiny_copy), paths)
    assert third.read == 2 and len(third.bad(paths)) == 1 and "x.png" in third.bad(paths)[0]


def test_index_splits_new_files_across_ranks(tiny_copy, monkeypatch, tmp_path):
    """Each rank reads only its share of the headers; the exchange gives every rank the whole index."""
    monkeypatch.setenv("SHIPCLASSIFIER_CACHE", str(tmp_path / "cache"))
    paths = sorted(str(p) for p in tiny_copy.rglob("*.png"))
    shares = {}

    def gather(found):   # stands in for all_gather_object: rank 1's share is read here as well
        shares[0] = set(found)
        other = build_index(str(tiny_copy) + "-r1", paths, rank=1, world_size=2)
        shares[1] = {p for p in paths[1::2]}
        return [found, {p: other.entries[p] for p in paths[1::2]}]

    idx = build_index(str(tiny_copy), paths, rank=0, world_size=2, gather=gather)
    assert shares[0] == set(paths[0::2])
    assert set(idx.entries) == set(paths) and not idx.bad(paths)


def test_check_data_decodes_everything_and_lists_bad_files(tiny_copy, capsys):
    assert cli("check-data", "--data", tiny_copy, "--quiet") == 0
    assert "96 of 96 images decode" in capsys.readouterr().out
    bad = sorted((tiny_copy / "val" / "1").glob("*.png"))[0]
    _truncate(bad)    # the header survives: only a full decode finds it
    assert cli("check-data", "--data", tiny_copy, "--quiet") == 1
    out = capsys.readouterr().out
    assert str(bad) in out and "95 of 96" in out and "--on-bad-image skip" in out
