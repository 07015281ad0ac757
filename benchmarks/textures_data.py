"""A second real-image dataset that needs no download: texture crops of the photographs inside scikit-image.

    python benchmarks/textures_data.py --out data/textures        # pip install scikit-image (the dev extra)

scikit-image's wheel ships a few real photographs (``skimage.data``: brick, grass, gravel, the
cameraman, coins, the moon, ...). Each becomes one class: random square crops (48-112 px, resized
to 64 px, greyscale so colour alone cannot tell them apart) labelled by the photograph they come
from. Train crops come from the left 70% of each photograph and val crops from the right 30%, so
no val pixel was seen in training. Writes ``OUT/train/<class>/*.png``, ``OUT/val/<class>/*.png``
and ``OUT/dataset.json``; seeded, so the same command writes the same images.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# photographs that ship inside the package (skimage.data's "legacy" files): nothing is downloaded
SOURCES = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "astronaut", "chelsea", "coffee")


@dataclass
class TexturesConfig:
    out: str
    train_per_class: int = 160
    val_per_class: int = 40
    size: int = 64
    min_crop: int = 48
    max_crop: int = 112
    train_fraction: float = 0.7  # of each photograph's width
    seed: int = 0


def grey_photo(name: str) -> np.ndarray:
    """(H, W) uint8 from skimage.data's bundled file (refuses anything that would be downloaded)."""
    from skimage import data
    from skimage.color import rgb2gray

    if name not in data.__all__:
        raise SystemExit(f"skimage.data has no {name!r}")
    img = getattr(data, name)()
    if img.ndim == 3:
        img = np.rint(rgb2gray(img[..., :3]) * 255).astype(np.uint8)
    return img


def crops(img: np.ndarray, count: int, x0: int, x1: int, cfg: TexturesConfig, rng: np.random.Generator):
    h = img.shape[0]
    biggest = min(cfg.max_crop, h, x1 - x0)
    for _ in range(count):
        s = int(rng.integers(min(cfg.min_crop, biggest), biggest + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(x0, x1 - s + 1))
        yield Image.fromarray(img[y:y + s, x:x + s]).resize((cfg.size, cfg.size), Image.BILINEAR)


def write_textures(cfg: TexturesConfig) -> dict:
    out, rng = Path(cfg.out), np.random.default_rng(cfg.seed)
    for name in SOURCES:
        img = grey_photo(name)
        split = int(img.shape[1] * cfg.train_fraction)
        for part, count, (x0, x1) in (("train", cfg.train_per_class, (0, split)),
                                      ("val", cfg.val_per_class, (split, img.shape[1]))):
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(crops(img, count, x0, x1, cfg, rng)):
                crop.save(folder / f"{name}_{i:04d}.png")
    info = {"settings": asdict(cfg), "classes": list(SOURCES), "train": cfg.train_per_class * len(SOURCES),
            "val": cfg.val_per_class * len(SOURCES)}
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-class", type=int, default=160)
    p.add_argument("--val-per-class", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = write_textures(TexturesConfig(a.out, a.train_per_class, a.val_per_class, seed=a.seed))
    print(f"textures: {info['train']} train / {info['val']} val images, {len(SOURCES)} classes in {a.out}")


if __name__ == "__main__":
    main()
