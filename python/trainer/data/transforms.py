"""Train and eval transforms, defined once.

Everything works on uint8 tensors (C, H, W); normalisation happens later, on the whole batch
(in the training loop, and inside exported graphs), so the pipeline that leaves the data loader is
uint8 RGB everywhere.

The eval transform is fully described by ``PreprocessSpec``, which is plain data: it is saved in
every checkpoint and written into every bundle manifest, and the C++ runtime reproduces it with the
same torch kernels:

1. decode to RGB uint8 (see images.py)
2. resize so the shorter side equals ``resize_size`` (longer side ``int(resize_size * long / short)``)
   with ``torch.nn.functional.interpolate(mode=interpolation, antialias=True, align_corners=False)``;
   ``resize_kernel`` says how: ``"uint8"`` (the default since it was added: torch's integer kernel
   straight on the uint8 image, 7x faster) or ``"float32"`` (interpolate in float32, round
   half-to-even, clamp to [0, 255]: what specs without the key mean, so older checkpoints and
   bundles keep their exact preprocessing). The two differ by at most 1 grey level per pixel.
3. center crop to ``crop_size`` (top = ``int(round((h - ch) / 2))``, likewise left)
4. (in the model) ``(x / 255 - mean) / std``
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")
RESIZE_KERNELS = ("uint8", "float32")


@dataclass
class PreprocessSpec:
    crop_size: tuple[int, int]
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_policy: str = "shorter_side"
    crop: str = "center"
    channel_order: str = "RGB"
    input_dtype: str = "uint8"
    layout: str = "NCHW"
    alpha: str = "drop"
    exif_orientation: bool = True
    sixteen_bit: str = "round(v/257)"
    resize_kernel: str = "uint8"          # uint8 | float32 (see the module docstring)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.resize_kernel not in RESIZE_KERNELS:
            raise UserError(f"resize_kernel must be one of {RESIZE_KERNELS}, got {self.resize_kernel!r}")

    @classmethod
    def for_size(cls, img_size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> "PreprocessSpec":
        if not 0.0 < crop_pct <= 1.0:
            raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        return cls(crop_size=(img_size, img_size), resize_size=int(math.floor(img_size / crop_pct)),
                   interpolation=interpolation, mean=tuple(mean), std=tuple(std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crop_size"] = list(self.crop_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        d = dict(d)
        d["crop_size"] = tuple(d["crop_size"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d.setdefault("resize_kernel", "float32")  # written before the key existed: the float32 kernel
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown preprocessing keys {sorted(unknown)}")
        return cls(**d)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Shorter side to ``size``; the longer side scaled and truncated (torchvision's rule)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_uint8(img: torch.Tensor, out_hw: tuple[int, int], interpolation: str = "bilinear",
                 kernel: str = "float32") -> torch.Tensor:
    """(C, H, W) or (N, C, H, W) uint8 -> same rank uint8 of size out_hw (antialiased).

    The uint8 kernel gives the same result for any memory layout and thread count (checked in tests)."""
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(out_hw):
        if kernel == "uint8":
            x = F.interpolate(x, size=out_hw, mode=interpolation, antialias=True, align_corners=False)
        elif kernel == "float32":
            y = F.interpolate(x.float(), size=out_hw, mode=interpolation, antialias=True, align_corners=False)
            x = y.round_().clamp_(0, 255).to(torch.uint8)
        else:
            raise UserError(f"resize kernel must be one of {RESIZE_KERNELS}, got {kernel!r}")
    return x if batched else x.squeeze(0)


def center_crop(img: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    h, w = img.shape[-2:]
    ch, cw = crop_hw
    if ch > h or cw > w:
        raise UserError(f"cannot center-crop {ch}x{cw} from a {h}x{w} image")
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img[..., top:top + ch, left:left + cw]


def hwc_to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, copy=True, order="C")).permute(2, 0, 1).contiguous()


def eval_transform(img: torch.Tensor | np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Decoded RGB image ((H, W, 3) array or (3, H, W) tensor, uint8) -> (3, cH, cW) uint8."""
    if isinstance(img, np.ndarray):
        # the uint8 kernel reads the (H, W, 3) array in place (a channels-last view); float32 wants a copy
        img = (torch.from_numpy(img).permute(2, 0, 1) if spec.resize_kernel == "uint8" and img.flags.writeable
               and img.flags.c_contiguous else hwc_to_chw(img))
    h, w = img.shape[-2:]
    img = resize_uint8(img, resized_shape(h, w, spec.resize_size), spec.interpolation, spec.resize_kernel)
    return center_crop(img, spec.crop_size).contiguous()


class Normalize(torch.nn.Module):
    """uint8 or float pixels in [0, 255], (N, 3, H, W) -> normalised float32."""

    def __init__(self, mean, std):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("inv_std", 1.0 / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std


@dataclass
class AugmentConfig:
    img_size: int
    scale_min: float = 0.08
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    auto_augment: str = "none"  # none | randaugment | trivialaugment
    random_erasing: float = 0.0
    interpolation: str = "bilinear"


def build_train_transform(cfg: AugmentConfig):
    """(3, H, W) uint8 -> (3, S, S) uint8 with random crop, flips and optional policies."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

    interp = InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR
    ops: list = [v2.RandomResizedCrop(cfg.img_size, scale=(cfg.scale_min, 1.0), ratio=cfg.ratio,
                                      interpolation=interp, antialias=True)]
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ops.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.auto_augment == "randaugment":
        ops.append(v2.RandAugment(interpolation=interp))
    elif cfg.auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(interpolation=interp))
    elif cfg.auto_augment != "none":
        raise UserError(f"unknown auto_augment {cfg.auto_augment!r}: use none, randaugment or trivialaugment")
    if cfg.random_erasing > 0:
        ops.append(v2.RandomErasing(p=cfg.random_erasing, value=0))
    return v2.Compose(ops)
