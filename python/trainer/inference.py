"""A ready-to-run model rebuilt from a training checkpoint (used by evaluate, predict, export).

Not to be confused with engine/checkpoint.py, which writes and reads the checkpoint files themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .data import PreprocessSpec
from .engine.checkpoint import CheckpointError, load_checkpoint
from .models import create_model, get_spec
from .models.registry import ModelSpec
from .errors import UserError


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, float32, on CPU
    spec: ModelSpec
    classes: list[str]
    preprocess: PreprocessSpec
    checkpoint: dict
    weights: str  # "model" or "ema"


def model_from_checkpoint(path: str | os.PathLike, weights: str = "auto") -> LoadedModel:
    """weights: 'auto' (whichever scored best on validation), 'model' or 'ema'."""
    ckpt = load_checkpoint(path)
    try:
        spec = get_spec(ckpt["arch"])
    except KeyError as exc:
        raise CheckpointError(f"{ckpt['path']}: {exc.args[0]}") from None
    pre = PreprocessSpec.from_dict(ckpt["preprocess"])
    model = create_model(ckpt["arch"], ckpt["num_classes"], pre.crop_size[0])
    if weights == "auto":
        weights = ckpt.get("best_source", "model")
    if weights == "ema":
        if not ckpt.get("ema"):
            raise CheckpointError(f"{ckpt['path']} has no EMA weights (train with --ema)")
        state = ckpt["ema"]["module"]
    elif weights == "model":
        state = ckpt["model"]
    else:
        raise UserError(f"weights must be auto, model or ema (got {weights!r})")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt['path']}: weights do not fit {ckpt['arch']} with {ckpt['num_classes']} "
                              f"classes: {str(exc).splitlines()[0]}") from None
    model = model.to(memory_format=torch.contiguous_format).eval()
    return LoadedModel(model, spec, list(ckpt["classes"]), pre, ckpt, weights)
