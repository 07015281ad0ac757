"""python -m batch on Ray Data: ``--ray-address local`` (a Ray instance of the machine's CPUs, started and shut
down by the command) runs the job end to end in a child process, as a user runs it, and its output equals the
embedded run's; a job that failed on one engine resumes on the other from the same parts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from batch import BatchOptions, run_batch
from batch_fixtures import hflip_bundle, image_tree  # noqa: F401
from conftest import REPO
from test_batch import rows_by_path

if importlib.util.find_spec("ray") is None:
    pytest.skip("the dev extra installs ray[data]: pip install -e '.[dev]'", allow_module_level=True)


def ray_cli(bundle, images, out, **common) -> dict:
    """``python -m batch --ray-address local`` in a child process, as a user runs it; its summary.

    Not ray.init in the test process: the Ray driver's threads and signal handlers stay out of the pytest
    process, and the job and its Ray instance live and end in the child. (The CI segfault after this file
    came from torch's DataLoader SIGCHLD handler, not Ray: tests/conftest.py restores SIGCHLD.)"""
    path = os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "batch", "--bundle", str(bundle), "--images", str(images), "--out", str(out),
           "--ray-address", "local", "--ray-workers", "2", "--json", "--quiet"]
    for key, value in common.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Crash(RuntimeError):
    pass


def test_ray_output_equals_the_embedded_run_and_resumes_across_engines(hflip_bundle, image_tree, tmp_path):
    """One Ray run (a Ray instance starts in 10-20 s on 2 cores): it resumes a job the embedded engine left
    after its first part, and the finished output equals an uninterrupted embedded run row for row: Ray
    wrote the other 15 rows, the unreadable file's error row among them."""
    common = dict(backend="torchscript", topk=3, save_probs=True, batch_size=4)
    embedded = tmp_path / "embedded"
    run_batch(BatchOptions(bundle=str(hflip_bundle), images=str(image_tree), **common, out=str(embedded), workers=1,
                           part_size=10, progress=False))
    want = rows_by_path(embedded)
    assert len(want) == 25 and sum(r["error"] is not None for r in want.values()) == 1

    # the embedded engine fails after one part; Ray finishes the job from the same done-manifest
    mixed = tmp_path / "mixed"

    def crash(path, parts):
        raise Crash(path)

    with pytest.raises(Crash):
        run_batch(BatchOptions(bundle=str(hflip_bundle), images=str(image_tree), **common, out=str(mixed), workers=0,
                               part_size=10, progress=False), on_part=crash)
    assert len(rows_by_path(mixed)) == 10
    resumed = ray_cli(hflip_bundle, image_tree, mixed, part_size=10, **common)
    assert (resumed["engine"], resumed["skipped"], resumed["written"], resumed["errors"]) == ("ray", 10, 15, 1)
    got = rows_by_path(mixed)
    assert sorted(got) == sorted(want)
    for path, row in want.items():
        for key in ("label", "topk_labels", "error", "bundle_name", "bundle_version", "bundle_sha256"):
            assert got[path][key] == row[key], (path, key)
        if row["error"] is None:
            np.testing.assert_allclose(got[path]["probs"], row["probs"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(got[path]["topk_probs"], row["topk_probs"], rtol=0, atol=1e-5)
