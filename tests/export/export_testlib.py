"""Helpers for the export tests (a module, not a conftest: tests/trainer imports 'conftest' by name)."""
from __future__ import annotations

from pathlib import Path

import torch

TINY_CLASSES = ["0", "1", "7"]  # the classes of the tiny_digits fixture


def write_checkpoint(path: Path, arch: str, classes=TINY_CLASSES, img_size: int = 32, seed: int = 0,
                     num_classes: int | None = None) -> Path:
    """An untrained model saved the way trainer.engine.train._checkpoint saves a trained one."""
    from trainer.data import PreprocessSpec
    from trainer.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from trainer.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, len(classes), img_size).eval()
    pre = PreprocessSpec.for_size(img_size, crop_pct=1.0)
    atomic_save({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes or len(classes),
                 "classes": list(classes), "preprocess": pre.to_dict(), "config": {"data": "synthetic"},
                 "model": model.state_dict(), "ema": None, "epoch": 0, "best_metric": None, "best_epoch": None,
                 "best_source": "model", "metrics": {}}, path)
    return path


def export_cli(*args: str, capsys=None) -> tuple[int, str]:
    """Run ``python -m export ARGS`` in-process; returns (exit code, stderr)."""
    from export.cli import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err
