"""The digits demo: scikit-learn's 1,797 real handwritten digits as an image-folder dataset.

    python -m trainer demo-data --out data/digits
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .layout import stratified_split

DIGITS_SCALE = 4  # 8x8 scans upscaled to 32x32 so they look like digits and crop sensibly


def write_digits_dataset(out: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0,
                         force: bool = False) -> dict:
    """Write ``out/train/<digit>/*.png`` and ``out/val/<digit>/*.png`` (stratified, seeded).

    Idempotent: an existing complete dataset written with the same settings is left alone.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    marker = out / "dataset.json"
    settings = {"source": "sklearn.datasets.load_digits", "val_fraction": val_fraction, "seed": seed,
                "scale": DIGITS_SCALE}
    if marker.is_file() and not force:
        info = json.loads(marker.read_text())
        if info.get("settings") == settings and _count_pngs(out) == info.get("total"):
            return info
    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    labels = digits.target.tolist()
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    for split, idxs in (("train", train_idx), ("val", val_idx)):
        for i in idxs:
            folder = out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((8 * DIGITS_SCALE,) * 2, Image.BICUBIC)
            img.save(folder / f"digit_{i:04d}.png")
    info = {"settings": settings, "total": len(labels), "train": len(train_idx), "val": len(val_idx),
            "classes": [str(c) for c in range(10)]}
    marker.write_text(json.dumps(info, indent=2))
    return info


def _count_pngs(root: Path) -> int:
    return sum(1 for _ in root.glob("*/*/*.png"))
