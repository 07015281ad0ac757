"""python -m batch on Ray Data: a local Ray cluster (2 CPUs, started here, shut down after) runs the job
end to end, and its output equals the embedded run's; a job that failed on one engine resumes on the
other from the same parts."""
from __future__ import annotations

import os

import numpy as np
import pytest

from batch import BatchOptions, run_batch
from batch_fixtures import hflip_bundle, image_tree  # noqa: F401
from conftest import REPO
from test_batch import rows_by_path

ray = pytest.importorskip("ray", reason="the dev extra installs ray[data]: pip install -e '.[dev]'")
# Ray Data's own DataContext reads its deprecated fields when it is pickled to the actors
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_cluster():
    # workers are fresh interpreters: they import batch from this checkout, as the driver does
    path = os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, address="local",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}}, log_to_driver=False)
    yield
    ray.shutdown()


class Crash(RuntimeError):
    pass


def test_ray_output_equals_the_embedded_run_and_resumes_across_engines(ray_cluster, hflip_bundle, image_tree,
                                                                       tmp_path):
    common = dict(bundle=str(hflip_bundle), images=str(image_tree), backend="torchscript", topk=3,
                  save_probs=True, batch_size=4, progress=False)
    embedded = tmp_path / "embedded"
    run_batch(BatchOptions(**common, out=str(embedded), workers=1, part_size=10))
    on_ray = tmp_path / "ray"
    summary = run_batch(BatchOptions(**common, out=str(on_ray), part_size=10, ray_address="auto", ray_workers=2))
    assert (summary.engine, summary.written, summary.errors) == ("ray", 25, 1)
    want, got = rows_by_path(embedded), rows_by_path(on_ray)
    assert sorted(got) == sorted(want)
    for path, row in want.items():
        for key in ("label", "topk_labels", "error", "bundle_name", "bundle_version", "bundle_sha256"):
            assert got[path][key] == row[key], (path, key)
        if row["error"] is None:
            np.testing.assert_allclose(got[path]["probs"], row["probs"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(got[path]["topk_probs"], row["topk_probs"], rtol=0, atol=1e-5)

    # the embedded engine fails after one part; Ray finishes the job from the same done-manifest
    mixed = tmp_path / "mixed"

    def crash(path, parts):
        raise Crash(path)

    with pytest.raises(Crash):
        run_batch(BatchOptions(**common, out=str(mixed), workers=0, part_size=10), on_part=crash)
    resumed = run_batch(BatchOptions(**common, out=str(mixed), part_size=10, ray_address="auto", ray_workers=2))
    assert (resumed.skipped, resumed.written) == (10, 15)
    got = rows_by_path(mixed)
    assert sorted(got) == sorted(want)
    assert all(got[p]["topk_labels"] == want[p]["topk_labels"] for p in want)
