"""Test-time augmentation policies, defined once as data.

A policy is a list of views. Each view is (resize, crop, flip):

- ``resize``: shorter side in pixels before cropping (None: the preprocessing's own resize_size)
- ``crop``: ``center``, ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right`` (crop_size each)
- ``flip``: ``none``, ``h``, ``v``, ``hv``

Named policies: ``none``, ``hflip``, ``vflip``, ``hvflip`` (the identity plus each flip),
``five-crop``, ``ten-crop`` (five crops and their horizontal mirrors), ``multiscale:S1,S2,...``
(center crops after resizing the shorter side to each S). The explicit view list is written into
bundle manifests so every consumer (Python, C++, server) applies the same views. Views' softmax
probabilities are merged by ``mean``, ``max`` (then renormalised) or ``vote`` (majority of top-1,
ties to the lowest class index; returned as vote fractions).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .data.transforms import PreprocessSpec, hwc_to_chw, resize_uint8, resized_shape
from .errors import UserError

CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
FLIPS = ("none", "h", "v", "hv")
MERGES = ("mean", "max", "vote")
NAMED = ("none", "hflip", "vflip", "hvflip", "five-crop", "ten-crop", "multiscale:S1,S2,...")


class TTAError(UserError):
    pass


@dataclass(frozen=True)
class TTAView:
    resize: int | None = None
    crop: str = "center"
    flip: str = "none"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise TTAError(f"unknown crop {self.crop!r}; use one of {CROPS}")
        if self.flip not in FLIPS:
            raise TTAError(f"unknown flip {self.flip!r}; use one of {FLIPS}")
        if self.resize is not None and self.resize <= 0:
            raise TTAError(f"resize must be positive, got {self.resize}")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_policy(name: str) -> list[TTAView]:
    name = (name or "none").strip()
    if name == "none":
        return [TTAView()]
    if name in ("hflip", "vflip", "hvflip"):
        flips = {"hflip": ["h"], "vflip": ["v"], "hvflip": ["h", "v", "hv"]}[name]
        return [TTAView()] + [TTAView(flip=f) for f in flips]
    if name == "five-crop":
        return [TTAView(crop=c) for c in CROPS]
    if name == "ten-crop":
        return [TTAView(crop=c) for c in CROPS] + [TTAView(crop=c, flip="h") for c in CROPS]
    if name.startswith("multiscale:"):
        try:
            sizes = [int(s) for s in name.split(":", 1)[1].split(",") if s.strip()]
        except ValueError:
            sizes = []
        if not sizes:
            raise TTAError(f"bad TTA policy {name!r}: write multiscale:S1,S2,... with integer sizes")
        return [TTAView(resize=s) for s in sizes]
    raise TTAError(f"unknown TTA policy {name!r}; use one of {', '.join(NAMED)}")


def views_from_data(views: list[dict]) -> list[TTAView]:
    return [TTAView(**v) for v in views]


def check_views(views: list[TTAView], spec: PreprocessSpec) -> None:
    ch, cw = spec.crop_size
    for v in views:
        size = v.resize or spec.resize_size
        if size < min(ch, cw):
            raise TTAError(f"TTA resize {size} is smaller than the {ch}x{cw} crop; use sizes >= {max(ch, cw)}")


def _crop_box(h: int, w: int, ch: int, cw: int, where: str) -> tuple[int, int]:
    if where == "center":
        return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    top = 0 if where.startswith("top") else h - ch
    left = 0 if where.endswith("left") else w - cw
    return top, left


def apply_views(img, spec: PreprocessSpec, views: list[TTAView]) -> torch.Tensor:
    """Decoded image ((H, W, 3) array or (3, H, W) uint8 tensor) -> (V, 3, cH, cW) uint8."""
    if not isinstance(img, torch.Tensor):
        img = hwc_to_chw(img)
    h, w = img.shape[-2:]
    ch, cw = spec.crop_size
    resized: dict[int, torch.Tensor] = {}
    out = []
    for v in views:
        size = v.resize or spec.resize_size
        if size not in resized:
            resized[size] = resize_uint8(img, resized_shape(h, w, size), spec.interpolation, spec.resize_kernel)
        r = resized[size]
        rh, rw = r.shape[-2:]
        if ch > rh or cw > rw:
            raise TTAError(f"TTA resize {size} leaves a {rh}x{rw} image, smaller than the {ch}x{cw} crop")
        top, left = _crop_box(rh, rw, ch, cw, v.crop)
        x = r[:, top:top + ch, left:left + cw]
        if v.flip in ("h", "hv"):
            x = x.flip(-1)
        if v.flip in ("v", "hv"):
            x = x.flip(-2)
        out.append(x)
    return torch.stack(out).contiguous()


def merge_probs(probs: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(V, N, K) per-view probabilities -> (N, K)."""
    if how == "mean":
        return probs.mean(0)
    if how == "max":
        m = probs.max(0).values
        return m / m.sum(-1, keepdim=True)
    if how == "vote":
        k = probs.shape[-1]
        votes = torch.nn.functional.one_hot(probs.argmax(-1), k).sum(0).float()  # (N, K)
        return votes / probs.shape[0]
    raise TTAError(f"unknown TTA merge {how!r}; use one of {MERGES}")
