"""Tiny trained checkpoints shared by the extras tests (predict, ensemble, distill, features, visualize).

Trained once per session on the tiny_digits fixture (3 classes, 72 training images, 32x32) and
memoised here, so every test module that asks gets the same files. The settings (3 epochs of AdamW at
1e-3) reach 100% validation top-1 in fp32 and bf16 and on AVX2-only CPUs: with 2 epochs at 2e-3 the
BatchNorm running statistics had seen too few steps and an fp32 model could collapse to one class.
"""
from __future__ import annotations

from pathlib import Path

from conftest import TEST_AMP
from trainer.config import TrainConfig
from trainer.engine.train import train

_CACHE: dict[str, Path] = {}


def tiny_checkpoint(tmp_path_factory, data: Path, name: str = "r18", **overrides) -> Path:
    """RUN/best.pt of a 3-epoch run; ``name`` keys the memo (same name, same settings)."""
    if name not in _CACHE:
        out = tmp_path_factory.mktemp(f"run_{name}")
        cfg = dict(data=str(data), out=str(out), model="resnet18", img_size=32, crop_pct=1.0, batch_size=16,
                   workers=0, hflip=0.0, scale_min=0.8, optimizer="adamw", lr=1e-3, warmup_epochs=0.0, epochs=3, quiet=True,
                   amp=TEST_AMP, channels_last=False)
        cfg.update(overrides)
        train(TrainConfig(**cfg))
        _CACHE[name] = out / "best.pt"
    return _CACHE[name]


def cli(*args) -> int:
    """Run ``python -m trainer ARGS`` in this process (a subprocess would pay torch's import again)."""
    from trainer.cli import main

    return main([str(a) for a in args])


def perturbed_copy(ckpt: Path, out: Path, seed: int = 1, scale: float = 0.05) -> Path:
    """A second, genuinely different member for ensemble tests without a second training run: the
    checkpoint with seeded Gaussian noise added to every floating-point weight."""
    import torch

    from trainer.engine.checkpoint import atomic_save, load_checkpoint

    c = load_checkpoint(ckpt)
    c.pop("path")
    g = torch.Generator().manual_seed(seed)
    c["model"] = {k: (v + scale * v.std().nan_to_num() * torch.randn(v.shape, generator=g)
                      if v.is_floating_point() and v.numel() > 1 else v) for k, v in c["model"].items()}
    atomic_save(c, out)
    return out
