"""An ensemble's tta.merge merges every member's TTA views (docs/BUNDLE.md "Ensembles"), as the C++
runtime and the server do; Python used each member's own merge, so 'export ensemble --tta-merge max'
changed nothing there. Fake runtimes keep this test free of exports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from trainer.data import PreprocessSpec
from trainer.tta import parse_policy

from export.loader import EnsembleBundle, ModelBundle, fuse
from export.manifest import preprocessing_dict

CLASSES = ["a", "b", "c"]


def _member(seed: int, merge: str) -> ModelBundle:
    weights = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))

    def run(x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) uint8 -> (N, 3): depends on the left/right halves
        half = x.shape[-1] // 2
        feats = x[..., :half].float().mean((2, 3)) - x[..., half:].float().mean((2, 3))  # (N, 3)
        return torch.softmax(feats @ weights / 10, dim=1)

    manifest = {"classes": CLASSES, "preprocessing": preprocessing_dict(PreprocessSpec.for_size(16, 1.0)),
                "max_batch": 8, "tta": {"default": "hflip", "merge": merge, "views": [{}]},
                "input": {"shape": [-1, 3, 16, 16]}}
    return ModelBundle(Path(f"m{seed}"), manifest, run, "fake")


def test_the_ensemble_merge_is_used_for_every_member():
    members = [_member(1, "mean"), _member(2, "mean")]
    manifest = {"classes": CLASSES, "fusion": "weighted", "members": [{"weight": 2.0}, {"weight": 1.0}],
                "tta": {"default": "hflip", "merge": "max", "views": [v.to_dict() for v in parse_policy("hflip")]}}
    ensemble = EnsembleBundle(Path("ens"), manifest, members)
    images = [np.random.default_rng(i).integers(0, 256, (16, 20, 3), dtype=np.uint8) for i in range(4)]
    got = ensemble.predict(images).probs

    views = parse_policy("hflip")
    per_member = {how: [m.probs_decoded(images, views, how) for m in members] for how in ("max", "mean")}
    want = fuse(per_member["max"], [2.0, 1.0], "weighted")
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the old behaviour (each member's own "mean") gives another answer on these images
    assert np.abs(fuse(per_member["mean"], [2.0, 1.0], "weighted") - got).max() > 1e-3
    # and a member on its own still uses its own merge
    assert np.allclose(members[0].predict(images, tta="hflip").probs, per_member["mean"][0], atol=1e-6)
