"""Exponential moving average of model weights (parameters and float buffers)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """ema = decay_t * ema + (1 - decay_t) * model, decay_t = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_f, src_f = [], []
        for e, s in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                ema_f.append(e)
                src_f.append(s.detach())
            else:
                e.copy_(s)
        torch._foreach_lerp_(ema_f, src_f, 1.0 - d)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
