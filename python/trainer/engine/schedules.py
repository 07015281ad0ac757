"""Learning-rate schedules, stepped once per optimizer step.

warmup (both kinds): for step < W, lr = warmup_lr + (base_lr - warmup_lr) * step / W
cosine: after warmup, lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2,
        t = (step - W) / (total - W)
step:   after warmup, lr = base_lr * gamma ** (number of milestones <= step)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class LRSchedule:
    kind: str  # "cosine" | "step"
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    milestones: list[int] = field(default_factory=list)  # in steps
    gamma: float = 0.1
    step: int = 0

    def __post_init__(self):
        if self.kind not in ("cosine", "step"):
            raise UserError(f"unknown scheduler {self.kind!r}: use cosine or step")
        if self.total_steps <= 0:
            raise UserError("total_steps must be positive")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        passed = sum(1 for m in self.milestones if step >= m)
        return self.base_lr * self.gamma ** passed

    def apply(self, optimizer) -> float:
        """Set the lr for the current step on every param group (keeping per-group scales)."""
        lr = self.lr_at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
