"""Loading local pretrained weights (torchvision or efficientnet-pytorch key layouts, or our own
checkpoints) into a registry model whose head was replaced."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .registry import ModelSpec, head_prefix
from ..errors import MissingFileError, UserError

log = logging.getLogger(__name__)


class WeightsMismatchError(UserError):
    pass


@dataclass
class LoadReport:
    loaded: int
    skipped: list[str]

    def __str__(self) -> str:
        return f"loaded {self.loaded} tensors; skipped {len(self.skipped)} (head): {', '.join(self.skipped) or '-'}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a plain ``torch.save(state_dict)`` file or one of our checkpoints."""
    if not os.path.isfile(path):
        raise MissingFileError(f"pretrained weights '{path}' not found (weights are never downloaded; "
                                "give a local file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise WeightsMismatchError(f"cannot read '{path}' as a weights file: {exc}") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"'{path}' does not hold a state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model: nn.Module, spec: ModelSpec, path: str | os.PathLike) -> LoadReport:
    """Load every backbone tensor strictly; head tensors are skipped when their shape differs."""
    state = read_state_dict(path)
    own = model.state_dict()
    hp = head_prefix(model, spec)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    skipped = [k for k in wrong_shape if k.startswith(hp)]
    problems = [k for k in missing if not k.startswith(hp)] + [k for k in wrong_shape if not k.startswith(hp)]
    problems += [k for k in unexpected if not k.startswith(hp)]
    if problems:
        layout = "efficientnet-pytorch" if any(k.startswith("_blocks.") for k in state) else (
            "torchvision" if any(k.startswith(("layer1.", "features.")) for k in state) else "unknown")
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        bad = [k for k in wrong_shape if not k.startswith(hp)]
        if bad:
            detail.append(f"{len(bad)} with other shapes (e.g. {bad[0]}: file {tuple(state[bad[0]].shape)} "
                          f"vs model {tuple(own[bad[0]].shape)})")
        raise WeightsMismatchError(
            f"'{path}' does not match {spec.name} ({spec.source} layout): " + "; ".join(detail)
            + f". The file looks like a {layout}-layout state dict; pick the --model it was trained for.")
    skipped += [k for k in missing if k.startswith(hp)] + [k for k in unexpected if k.startswith(hp)]
    to_load = {k: v for k, v in state.items() if k in own and k not in skipped}
    model.load_state_dict(to_load, strict=False)
    return LoadReport(loaded=len(to_load), skipped=sorted(set(skipped)))


def set_backbone_trainable(model: nn.Module, spec: ModelSpec, trainable: bool) -> None:
    hp = head_prefix(model, spec)
    for name, p in model.named_parameters():
        if not name.startswith(hp):
            p.requires_grad_(trainable)
