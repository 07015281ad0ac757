"""Evaluate a checkpoint on labelled images.

    python -m trainer evaluate --checkpoint runs/digits/best.pt --data data/digits [--json]
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoints import model_from_checkpoint
from .data import Normalize, load_eval_samples
from .engine.evaluate import batch_logits, classification_report, eval_loader, write_report
from .engine.runtime import default_workers, resolve_amp, resolve_device


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | None = None, samples=None,
                        out_dir: str | os.PathLike | None = None, device="cpu", batch_size: int = 64,
                        workers: int = -1, weights: str = "auto", amp: str = "none") -> dict:
    """Full report for a checkpoint; writes report.json, CSVs and the confusion PNG when out_dir is set."""
    loaded = model_from_checkpoint(checkpoint, weights)
    if samples is None:
        if data is None:
            raise ValueError("give --data (a dataset root, a folder of class folders, or a list file)")
        cfg = loaded.checkpoint.get("config", {})
        samples = load_eval_samples(data, loaded.classes, cfg.get("val_fraction"), cfg.get("seed", 0))
    device = resolve_device(device) if isinstance(device, str) else device
    model = loaded.model.to(device)
    normalize = Normalize(loaded.preprocess.mean, loaded.preprocess.std).to(device)
    loader = eval_loader(samples, loaded.preprocess, batch_size, default_workers(workers))
    logits, labels = batch_logits(model, loader, device, normalize, resolve_amp(amp, device))
    probs = torch.softmax(logits, dim=1).numpy()
    report = classification_report(probs, labels.numpy(), loaded.classes)
    report.update(checkpoint=str(loaded.checkpoint["path"]), weights=loaded.weights, arch=loaded.spec.name)
    if out_dir is not None:
        report["files"] = write_report(report, Path(out_dir), loaded.classes)
    return report
