"""How a bundle turns image files into probabilities, split where the work can be spread out.

    plan = PredictPlan.of(load_bundle("bundles/digits"))
    crops, error = plan.preprocess("a.jpg")          # in a decode worker: [(V, 3, h, w) uint8 per member], ""
    probs = plan.predict(bundle, [crops, ...])       # in the process holding the model: (N, K) float32

``preprocess`` is the expensive, per-image part (decoding, resizing, the TTA views) and needs only
plain data (each member's PreprocessSpec and the views), so it runs in DataLoader worker processes or
Ray actors; only the small uint8 crops travel back. ``predict`` is what the loader's ``predict`` does
after decoding: each member's views through ``predict_tensor``, merged by the bundle's merge rule, and
for an ensemble fused by its fusion rule and weights (the same functions: trainer.tta.merge_probs,
export.loader.fuse). tests/batch checks the result against ``bundle.predict`` on the same files.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from export.loader import fuse
from trainer.data import ImageDecodeError, PreprocessSpec, decode_image
from trainer.tta import TTAView, apply_views, merge_probs


@dataclass(frozen=True)
class MemberPlan:
    spec: PreprocessSpec
    views: tuple[TTAView, ...]


@dataclass(frozen=True)
class PredictPlan:
    """Plain, picklable data: what each model (one, or each ensemble member) needs as input."""
    members: tuple[MemberPlan, ...]

    @classmethod
    def of(cls, bundle) -> "PredictPlan":
        # an ensemble applies its own views to every member, each with that member's preprocessing
        views = tuple(bundle.views)
        models = getattr(bundle, "members", None) or [bundle]
        return cls(tuple(MemberPlan(m.spec, views) for m in models))

    def empty(self) -> list[torch.Tensor]:
        """Zero crops of the right shapes: the placeholder of an unreadable image (never sent to the model)."""
        return [torch.zeros(len(m.views), 3, *m.spec.crop_size, dtype=torch.uint8) for m in self.members]

    def preprocess(self, path: str) -> tuple[list[torch.Tensor], str]:
        """One file -> (per member (V, 3, h, w) uint8 crops, "") or (placeholders, why it failed).

        Any failure on one image (unreadable, not an image, too large, a bug in a decoder) becomes that
        image's error row: one bad file among millions must not stop the job."""
        try:
            img = decode_image(path)
            return [apply_views(img, m.spec, list(m.views)) for m in self.members], ""
        except Exception as exc:  # noqa: BLE001 -- recorded in the row, with its type when it is not a decode error
            msg = str(exc) or type(exc).__name__
            if not isinstance(exc, ImageDecodeError):
                msg = f"{path}: {type(exc).__name__}: {msg}"
            return self.empty(), msg

    def predict(self, bundle, crops: list[torch.Tensor], ok: np.ndarray) -> np.ndarray:
        """crops[m]: (N, V, 3, h, w) uint8 for member m; ok: (N,) bool -> (N, K) float32, NaN where not ok.

        Only the readable images go through the model."""
        n = len(ok)
        k = len(bundle.classes)
        out = np.full((n, k), np.nan, dtype=np.float32)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return out
        models = getattr(bundle, "members", None) or [bundle]
        per_member = []
        for model, x in zip(models, crops):
            x = x[torch.from_numpy(idx)]
            b, v = x.shape[:2]
            probs = torch.from_numpy(model.predict_tensor(x.flatten(0, 1))).view(b, v, -1)  # (B, V, K)
            per_member.append(merge_probs(probs.transpose(0, 1), bundle.merge).numpy())
        if hasattr(bundle, "members"):
            out[idx] = fuse(per_member, bundle.weights, bundle.fusion)
        else:
            out[idx] = per_member[0]
        return out


def collate(items: list[tuple[str, list[torch.Tensor], str]]):
    """DataLoader collate: [(path, crops, error)] -> (paths, [stacked crops per member], errors)."""
    paths = [it[0] for it in items]
    n_members = len(items[0][1])
    crops = [torch.stack([it[1][m] for it in items]) for m in range(n_members)]
    return paths, crops, [it[2] for it in items]
