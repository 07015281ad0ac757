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
    def __init__(self, model: nn.Module, mean, std, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.dtype = dtype  # float16/bfloat16: the network runs in it; input and output keep the contract

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (N, 3, H, W) uint8 -> (N, K) float32 probabilities
        if self.dtype == torch.float32:
            return torch.softmax(self.model(self.normalize(images)), dim=-1)
        # normalise in float32 (x/255 loses digits in half), softmax in float32 (sums to 1 exactly enough)
        logits = self.model(self.normalize(images).to(self.dtype))
        return torch.softmax(logits.float(), dim=-1)


def make_exportable(model: nn.Module) -> nn.Module:
    """Swap training-only pieces for traceable ones (efficientnet-pytorch's memory-efficient swish)."""
    if hasattr(model, "set_swish"):
        model.set_swish(memory_efficient=False)
    return model


def probability_model(model: nn.Module, spec: PreprocessSpec, dtype: torch.dtype = torch.float32) -> ProbabilityModel:
    """dtype other than float32 converts ``model``'s weights in place: pass a copy to keep the original."""
    return ProbabilityModel(make_exportable(model).to(dtype), spec.mean, spec.std, dtype).eval()


def example_batch(spec: PreprocessSpec, n: int, seed: int = 0) -> torch.Tensor:
    """A deterministic synthetic uint8 batch (N, 3, cH, cW): torch.Generator(seed), uniform 0..255.

    Used to trace, and for parity checks only when no real image is available.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = spec.crop_size
    return torch.randint(0, 256, (n, 3, h, w), generator=gen, dtype=torch.uint8)
