"""Any timm model as ``timm/<name>`` (optionally ``timm/<name>.<weights tag>``), through the ``timm`` extra.

    python -m trainer train --model timm/convnext_nano --pretrained imagenet --data data/digits

The spec is made on first use from timm's own pretrained config: the head path
(``pretrained_cfg["classifier"]``), the default input size, and whether the input size is fixed
(ViT-like models take ``img_size=`` at construction, as in timm).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from ..errors import UnknownNameError
from .registry import ModelSpec

TIMM_PREFIX = "timm/"
INSTALL_HINT = "pip install 'shipclassifier[timm]' (or pip install timm)"


def import_timm():
    try:
        import timm
    except ImportError:
        raise UnknownNameError(f"timm models need the timm package: {INSTALL_HINT}") from None
    return timm


def timm_name(name: str) -> str:
    return name[len(TIMM_PREFIX):]


def pretrained_cfg(name: str) -> dict:
    """timm's pretrained config for ``timm/<arch>[.<tag>]`` (the default tag when none is given)."""
    timm = import_timm()
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(timm_name(name))
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0][:6]}*")[:12]
        raise UnknownNameError(f"unknown timm model {arch!r}; similar names: {', '.join(close) or '-'} "
                       "(timm.list_models() lists them all)")
    try:
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch, allow_unregistered=False)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise UnknownNameError(f"timm model {arch!r} has no weights tagged {tag!r}; known: {', '.join(tags) or 'none'}")
    return {**cfg.to_dict(), "name": f"{arch}.{cfg.tag}" if cfg.tag else arch}


def _build(name: str, fixed_size: bool, img_size: int) -> nn.Module:
    timm = import_timm()
    kw = {"img_size": img_size} if fixed_size else {}
    return timm.create_model(timm_name(name), pretrained=False, **kw)


def timm_spec(name: str) -> ModelSpec:
    cfg = pretrained_cfg(name)
    head = cfg.get("classifier")
    if not isinstance(head, str):  # e.g. distilled models with two heads
        raise UnknownNameError(f"{name}: timm reports classifier {head!r}; only models with one linear head are supported")
    fixed = bool(cfg.get("fixed_input_size"))
    multiple = 1
    if fixed:  # the patch size, read from a model on the meta device (no memory, no init cost)
        import torch

        with torch.device("meta"):
            model = _build(name, False, cfg["input_size"][-1])
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        multiple = int(patch[0]) if patch else 1
    return ModelSpec(name, "timm:" + cfg["architecture"], partial(_build, name, fixed), head,
                     "timm", int(cfg["input_size"][-1]), multiple)
