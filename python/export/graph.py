"""The exported graph: uint8 (N, 3, H, W) RGB in, softmax probabilities (N, K) out.

    from export.graph import probability_model
    net = probability_model(loaded.model, loaded.preprocess)   # Normalize -> model -> softmax

Normalisation and softmax are folded into every artifact (docs/BUNDLE.md), so no consumer
normalises and nobody can mistake logits for probabilities.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.data import Normalize, PreprocessSpec


class ProbabilityModel(nn.Module):
    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (N, 3, H, W) uint8 -> (N, K) float32 probabilities
        return torch.softmax(self.model(self.normalize(images)), dim=-1)


def make_exportable(model: nn.Module) -> nn.Module:
    """Swap training-only pieces for traceable ones (efficientnet-pytorch's memory-efficient swish)."""
    if hasattr(model, "set_swish"):
        model.set_swish(memory_efficient=False)
    return model


def probability_model(model: nn.Module, spec: PreprocessSpec) -> ProbabilityModel:
    return ProbabilityModel(make_exportable(model), spec.mean, spec.std).eval()


def example_batch(spec: PreprocessSpec, n: int, seed: int = 0) -> torch.Tensor:
    """A deterministic synthetic uint8 batch (N, 3, cH, cW): torch.Generator(seed), uniform 0..255.

    Used to trace, and for parity checks only when no real image is available.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = spec.crop_size
    return torch.randint(0, 256, (n, 3, h, w), generator=gen, dtype=torch.uint8)
