"""Pretrained weights by name, through each library's own weight API and download cache.

    python -m trainer train --model convnext_tiny --pretrained imagenet --data data/flowers
    python -m trainer train --model resnet50 --pretrained IMAGENET1K_V2 ...     # a torchvision weight set
    python -m trainer train --model efficientnet-b0 --pretrained advprop ...    # efficientnet-pytorch's
    python -m trainer train --model timm/convnext_nano --pretrained imagenet ...   # timm's default tag

``imagenet`` means the library's default ImageNet weights. Files live where the library keeps them
(torchvision and efficientnet-pytorch: ``$TORCH_HOME/hub/checkpoints/<file>``; timm: the Hugging Face
cache, or torch's when timm gives a URL), are downloaded once when online and used from the cache
without any network access afterwards. When neither works the error names the file to place and
the URL to fetch it from. The weights also bring their eval preprocessing (resize, crop,
interpolation, mean/std), which becomes the run's defaults (explicit flags still win).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from ..errors import UserError
from .registry import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")


class WeightsError(UserError):
    """Pretrained weights that cannot be used (base of the mismatch and unavailable errors)."""


class WeightsUnavailableError(WeightsError):
    """Named weights neither in the cache nor downloadable; the message names the file to place."""


@dataclass
class NamedWeights:
    label: str  # e.g. "torchvision ResNet50_Weights.IMAGENET1K_V2"
    url: str
    cache_file: Path  # where the library's cache keeps (or will keep) the file
    preprocess: dict  # img_size, crop_pct, interpolation, mean, std (TrainConfig field names)
    _load: Callable[[], dict] = field(repr=False, default=None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Read from the cache, downloading first only when the file is not there."""
        cached = self.cache_file.is_file()
        try:
            return self._load()
        except Exception as exc:  # noqa: BLE001 - urllib, http, hub and hash errors all mean "not available"
            if cached:
                raise WeightsError(f"{self.label}: the cached file {self.cache_file} cannot be read ({exc}); "
                                   "delete it to download it again") from exc
            raise WeightsUnavailableError(
                f"{self.label} are not in the cache and could not be downloaded ({type(exc).__name__}: {exc}).\n"
                f"  Place the file at: {self.cache_file}\n  (download it from {self.url} on a machine with "
                "network access), or pass --pretrained /path/to/that/file.") from exc


def is_weights_name(value: str) -> bool:
    """'imagenet', 'IMAGENET1K_V2', 'a1_in1k' are names; anything that looks like a path is a file."""
    return not (os.sep in value or "/" in value or value.lower().endswith(WEIGHT_FILE_SUFFIXES)
                or os.path.exists(value))


def crop_pct_for(crop: int, resize: int) -> float:
    """The crop_pct that gives exactly ``resize`` back through PreprocessSpec.for_size's floor."""
    pct = crop / resize
    return pct if math.floor(crop / pct) == resize else crop / (resize + 0.5)


def _preprocess(crop: int, resize: int, interpolation: str, mean, std) -> dict:
    return {"img_size": int(crop), "crop_pct": crop_pct_for(int(crop), int(resize)),
            "interpolation": "bicubic" if interpolation == "bicubic" else "bilinear",
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision(spec: ModelSpec, name: str) -> NamedWeights:
    from torchvision.models import get_model_weights

    enum = get_model_weights(spec.name)
    key = "DEFAULT" if name.lower() == "imagenet" else name.split(".")[-1]
    if key not in enum.__members__:
        raise WeightsError(f"{spec.name} has no weights named {name!r}; torchvision has "
                           f"{', '.join(enum.__members__)} (or 'imagenet' for DEFAULT), or give a file")
    w = enum[key]
    t = w.transforms()
    return NamedWeights(f"torchvision {w}", w.url, _hub_file(w.url),
                        _preprocess(t.crop_size[0], t.resize_size[0], t.interpolation.value, t.mean, t.std),
                        lambda: w.get_state_dict(progress=False, check_hash=True))


def _efficientnet_pytorch(spec: ModelSpec, name: str) -> NamedWeights:
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import url_map, url_map_advprop

    maps = {"imagenet": url_map, "advprop": url_map_advprop}
    if name.lower() not in maps:
        raise WeightsError(f"{spec.name} has no weights named {name!r}; efficientnet-pytorch has 'imagenet' and "
                           "'advprop', or give a file")
    url = maps[name.lower()][spec.name]
    size = EfficientNet.get_image_size(spec.name)
    # the library's ImageNet recipe: resize to the crop size (bicubic), AdvProp inputs scaled to [-1, 1]
    mean, std = ((0.5,) * 3, (0.5,) * 3) if name.lower() == "advprop" else (IMAGENET_MEAN, IMAGENET_STD)
    return NamedWeights(f"efficientnet-pytorch {spec.name} {name.lower()} weights", url, _hub_file(url),
                        _preprocess(size, size, "bicubic", mean, std),
                        lambda: torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False))


def _timm(spec: ModelSpec, name: str) -> NamedWeights:
    from .timm_models import pretrained_cfg, timm_name

    arch = timm_name(spec.name).split(".")[0]
    try:
        cfg = pretrained_cfg(spec.name if name.lower() == "imagenet" else f"timm/{arch}.{name}")
    except KeyError as exc:
        raise WeightsError(exc.args[0]) from None
    size = int(cfg["input_size"][-1])
    pre = _preprocess(size, math.floor(size / cfg.get("crop_pct", 0.875)), cfg.get("interpolation", "bicubic"),
                      cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    label = f"timm {cfg['name']} weights"
    if cfg.get("hf_hub_id"):
        return _hf_weights(label, cfg["hf_hub_id"], pre)
    if cfg.get("url"):
        url = cfg["url"]
        return NamedWeights(label, url, _hub_file(url), pre,
                            lambda: torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False))
    raise WeightsError(f"timm has no downloadable weights for {cfg['name']}; give a file")


def _hf_weights(label: str, repo: str, pre: dict) -> NamedWeights:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    filename = "model.safetensors"
    cached = try_to_load_from_cache(repo, filename)
    # the cache keeps blobs by hash behind snapshot links; name the snapshot path a download would create
    where = Path(cached) if isinstance(cached, str) else (
        Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>" / filename)

    def load() -> dict:
        from safetensors.torch import load_file

        path = cached if isinstance(cached, str) else hf_hub_download(repo, filename)
        return load_file(path)

    return NamedWeights(label, f"https://huggingface.co/{repo}/resolve/main/{filename}", where, pre, load)


def resolve_weights(spec: ModelSpec, name: str) -> NamedWeights:
    """The named weights of ``spec`` (no download yet: ``.state_dict()`` fetches)."""
    resolver = {"torchvision": _torchvision, "efficientnet-pytorch": _efficientnet_pytorch, "timm": _timm}
    return resolver[spec.source](spec, name)


DEFAULT_PREPROCESS = {"img_size": 224, "crop_pct": 0.875, "interpolation": "bilinear",
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def preprocessing_defaults(spec: ModelSpec, pretrained: str | None) -> dict:
    """The eval preprocessing a run gets for settings left unset: the named weights' own, else ours."""
    if pretrained and is_weights_name(pretrained):
        return dict(resolve_weights(spec, pretrained).preprocess)
    return dict(DEFAULT_PREPROCESS)
