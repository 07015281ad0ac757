"""A tiny model registry: ``register_model`` adds a builder, ``create_model`` builds one.

Every entry knows where its classifier head lives, so the head can be replaced for any class
count, removed for feature extraction, and skipped when loading pretrained weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UnknownNameError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    builder: Callable[[int], nn.Module]  # img_size -> model with its original head
    head: str  # dotted path to the final nn.Linear, e.g. "fc", "classifier.-1", "_fc"
    source: str  # "torchvision", "efficientnet-pytorch" or "timm"
    default_img_size: int = 224
    # input sizes the architecture accepts must be a multiple of this (ViT: the patch size)
    size_multiple: int = 1


# name prefix -> factory(full name) -> ModelSpec, for open-ended families ("timm/<name>")
_PREFIXES: dict[str, Callable[[str], ModelSpec]] = {}


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_prefix(prefix: str, factory: Callable[[str], ModelSpec]) -> None:
    """Names starting with ``prefix`` are built on first use by ``factory(name)`` (then cached)."""
    if prefix in _PREFIXES:
        raise ValueError(f"model prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = factory


def get_spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, factory in _PREFIXES.items():
        if name.startswith(prefix):
            return register_model(factory(name))
    raise UnknownNameError(f"unknown model {name!r}; 'python -m trainer models' lists the "
                           f"{len(_REGISTRY)} available: {', '.join(sorted(_REGISTRY))}"
                           + "".join(f"; or any {p}<name>" for p in _PREFIXES))


def list_models() -> list[ModelSpec]:
    """The explicitly registered models (not the open-ended prefixed ones built on first use)."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY) if not k.startswith(tuple(_PREFIXES))]


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """Return (parent module, attribute or index) for a dotted path with optional negative indices."""
    parts = path.split(".")
    parent = model
    for p in parts[:-1]:
        parent = parent[int(p)] if p.lstrip("-").isdigit() else getattr(parent, p)
    return parent, parts[-1]


def get_head(model: nn.Module, spec: ModelSpec) -> nn.Linear:
    parent, key = _resolve(model, spec.head)
    head = parent[int(key)] if key.lstrip("-").isdigit() else getattr(parent, key)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{spec.name}: expected nn.Linear at '{spec.head}', found {type(head).__name__}")
    return head


def set_head(model: nn.Module, spec: ModelSpec, module: nn.Module) -> None:
    parent, key = _resolve(model, spec.head)
    if key.lstrip("-").isdigit():
        parent[int(key)] = module
    else:
        setattr(parent, key, module)


def head_prefix(model: nn.Module, spec: ModelSpec) -> str:
    """The state-dict prefix of the head, e.g. 'classifier.3.' (negative indices resolved)."""
    head = get_head(model, spec)
    for name, mod in model.named_modules():
        if mod is head:
            return name + "."
    raise RuntimeError("head not found among named modules")


def replace_head(model: nn.Module, spec: ModelSpec, num_classes: int) -> nn.Linear:
    old = get_head(model, spec)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    set_head(model, spec, new)
    return new


def num_features(model: nn.Module, spec: ModelSpec) -> int:
    return get_head(model, spec).in_features


def create_model(name: str, num_classes: int, img_size: int | None = None) -> nn.Module:
    """Build a registered model (random init) with a fresh head for ``num_classes``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    spec = get_spec(name)
    img_size = img_size or spec.default_img_size
    if img_size % spec.size_multiple:
        raise ValueError(f"{name} needs an input size that is a multiple of {spec.size_multiple}, got {img_size}; "
                         f"pass e.g. --img-size {img_size // spec.size_multiple * spec.size_multiple or spec.size_multiple}")
    model = spec.builder(img_size)
    replace_head(model, spec, num_classes)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def penultimate(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """A view of ``model`` that returns the features that feed the head: (N, num_features)."""
    return _Penultimate(model, spec)


class _Penultimate(nn.Module):
    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = get_head(self.model, self.spec)
        captured = {}
        handle = head.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured["x"]
