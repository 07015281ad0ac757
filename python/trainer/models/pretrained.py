"""Loading pretrained weights into a registry model whose head was replaced: a local file
(torchvision, efficientnet-pytorch or timm key layouts, safetensors, or one of our checkpoints) or
weights by name (``imagenet``, a torchvision weight set, a timm tag: see weights.py)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MissingFileError
from .registry import ModelSpec, head_prefix
from .weights import WeightsError, is_weights_name, resolve_weights

log = logging.getLogger(__name__)


class WeightsMismatchError(WeightsError):
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
        raise MissingFileError(f"pretrained weights '{path}' not found; give a local file, or a weights name "
                               "such as 'imagenet' (downloaded once into the library's cache)")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
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


def _fit_input_size(model: nn.Module, spec: ModelSpec, state: dict) -> dict:
    """Position embeddings resampled to this model's input size (ViTs trained at another size), the way
    each library does it when it loads its own weights."""
    if spec.source == "torchvision" and spec.family == "vit":
        key = "encoder.pos_embedding"
        if key in state and state[key].shape != model.state_dict()[key].shape:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(model.image_size, model.patch_size, state)
    elif spec.source == "timm":
        import sys

        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None and spec.size_multiple > 1:  # ViT-like: resamples pos_embed to the model's grid
            state = filter_fn(state, model)
    return state


def load_pretrained(model: nn.Module, spec: ModelSpec, source: str | os.PathLike) -> LoadReport:
    """Load every backbone tensor strictly; head tensors are skipped when their shape differs.

    ``source``: a weights file, or a weights name (resolved by weights.resolve_weights)."""
    if isinstance(source, str) and is_weights_name(source):
        path = f"{spec.name} --pretrained {source}"
        state = _fit_input_size(model, spec, resolve_weights(spec, source).state_dict())
    else:
        path = source
        state = _fit_input_size(model, spec, read_state_dict(source))
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
