"""Optimizers with no weight decay on norm and bias parameters; fused kernels when available."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False, amp_dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        kwargs = dict(lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        cls = torch.optim.SGD
    elif name == "adamw":
        kwargs = dict(lr=lr)
        cls = torch.optim.AdamW
    else:
        raise UserError(f"unknown optimizer {name!r}: use sgd or adamw")
    # Fused single-kernel updates run on CPU and CUDA in this torch; fall back to foreach if a
    # parameter type is not supported. Only fused SGD mishandles the steps an fp16 GradScaler skips
    # (NaN weights on CUDA, seen on an H200 with torch 2.11); fused AdamW handles them.
    if not (name == "sgd" and amp_dtype == torch.float16):
        try:
            return cls(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass
    return cls(groups, foreach=True, **kwargs)
