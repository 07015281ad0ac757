"""A process loads each distinct .pt2 package once (export.formats.load_pt2).

torch never unloads a compiled AOTInductor library: it is built with GNU-unique symbols, so dlclose
leaves it mapped, its extracted file deleted but its disk space and pages held until the process exits.
Every load of the same bundle used to pin one more copy (the test process held 4 GiB of them halfway
through a run; a notebook or server that reopens a bundle grows the same way)."""
from __future__ import annotations

import gc
import shutil
import sys
import zipfile

import numpy as np
import pytest

from export import load_bundle
from export.formats import load_pt2

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def pinned_libraries() -> set[str]:
    """The AOTInductor libraries mapped into this process (extracted under a temporary aotinductor_* dir)."""
    with open("/proc/self/maps") as maps:
        return {line.split(None, 5)[5].strip().removesuffix(" (deleted)") for line in maps
                if "aotinductor_" in line and ".so" in line and len(line.split(None, 5)) == 6}


def test_reopening_a_bundle_reuses_its_loaded_library(bundle_a, tmp_path, eval_images):
    copy = tmp_path / "copy"
    shutil.copytree(bundle_a, copy)  # another folder, the same bytes
    first = load_bundle(bundle_a, backend="pt2", threads=1)
    expected = first.predict(eval_images).probs
    after_first = pinned_libraries()
    assert after_first, "the .pt2 backend mapped no AOTInductor library: this test checks nothing"
    del first
    gc.collect()
    for folder in (bundle_a, copy, bundle_a):
        again = load_bundle(folder, backend="pt2", threads=1)
        np.testing.assert_array_equal(again.predict(eval_images).probs, expected)
        assert pinned_libraries() == after_first  # nothing more mapped: the same loaded model answered


def test_other_bytes_get_their_own_model(bundle_a, tmp_path):
    """The key is the package's bytes, not its path or model name: a package that differs by one zip entry
    is loaded on its own (and a tampered one never reaches load_pt2: the manifest's sha256 refuses it)."""
    import torch

    src = bundle_a / "model.pt2"
    load_pt2(src)
    before = pinned_libraries()
    other = tmp_path / "model.pt2"
    shutil.copyfile(src, other)
    with zipfile.ZipFile(other, "a") as z:
        z.writestr("model/extra/note.txt", "same model, other bytes")
    run = load_pt2(other)
    assert len(pinned_libraries() - before) >= 1
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    torch.testing.assert_close(run(x), load_pt2(src)(x))
