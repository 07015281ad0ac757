"""Images used at export time: validation images for parity and int8 accuracy, calibration images.

    val = validation_images(spec, classes, data="data/digits")      # the dataset's val split
    cal = calibration_images(spec, "data/digits/train", count=256)

Which images verify a bundle, in order of preference:
1. ``--data``: the validation split of that dataset (or its class folders, or a list file);
2. ``--calibration``: its class folders (labelled) or, without class folders, its images unlabelled;
3. neither: a deterministic synthetic batch (``export.graph.example_batch``, seed 0), recorded as
   ``"synthetic"`` in the manifest so nobody mistakes it for a real-image check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data import DataError, decode_image, eval_transform, load_eval_samples
from trainer.data.images import is_image_file

from .graph import example_batch


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, cH, cW) uint8, preprocessed as the manifest says
    labels: list[int] | None  # None when unlabelled
    source: str  # where they came from, for the manifest and reports

    def __len__(self) -> int:
        return self.images.shape[0]


def _spread(items: list, count: int | None) -> list:
    """``count`` items evenly spread over ``items`` (all classes of a sorted listing get a share)."""
    if count is None or len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def load_images(paths: list[str], spec) -> torch.Tensor:
    return torch.stack([eval_transform(decode_image(p), spec) for p in paths])


def list_images(folder: str | os.PathLike) -> list[str]:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"'{folder}' is not a folder of images")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"'{folder}' holds no images ({', '.join(('.jpg', '.png', '...'))})")
    return files


def validation_images(spec, classes: list[str], data=None, calibration=None, limit: int | None = None) -> ImageSet:
    if data is not None:
        samples = _spread(load_eval_samples(data, classes), limit)
        return ImageSet(load_images([p for p, _ in samples], spec), [y for _, y in samples],
                        f"validation split of {data}")
    if calibration is not None:
        try:
            samples = _spread(load_eval_samples(calibration, classes), limit)
            return ImageSet(load_images([p for p, _ in samples], spec), [y for _, y in samples],
                            f"class folders of {calibration} (the calibration images)")
        except DataError:
            paths = _spread(list_images(calibration), limit)
            return ImageSet(load_images(paths, spec), None, f"unlabelled images of {calibration}")
    return ImageSet(example_batch(spec, 8), None, "synthetic")


def calibration_images(spec, folder, count: int = 256) -> ImageSet:
    paths = _spread(list_images(folder), count)
    return ImageSet(load_images(paths, spec), None, str(folder))
