"""Batched prediction with test-time augmentation, one CSV row per image.

    python -m trainer predict --checkpoint runs/digits/best.pt --images data/digits/val --out preds.csv \
        --tta multiscale:32,36 --topk 3 --save-probs

The TTA views come from ``trainer.tta`` (the same data the bundles carry). Every image gets a row:
an unreadable one gets an empty label and an ``error`` column saying why, plus a warning; nothing
is dropped silently. The CSV is ``id,label,prob[,top2_label,top2_prob,...][,prob_<class>...],error``.
"""
from __future__ import annotations

import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import ImageDecodeError, Normalize, PreprocessSpec, decode_image
from .data.images import is_image_file
from .engine.runtime import autocast
from .tta import TTAView, apply_views, check_views, merge_probs, parse_policy
from .errors import MissingFileError

log = logging.getLogger("trainer.predict")


class ViewsDataset(Dataset):
    """paths -> ((V, 3, cH, cW) uint8 views, error message or ""). A bad image yields zeros + its error
    (``strict=False``) or raises ImageDecodeError (``strict=True``)."""

    def __init__(self, paths: list[str], spec: PreprocessSpec, views: list[TTAView], strict: bool = False):
        check_views(views, spec)
        self.paths, self.spec, self.views, self.strict = paths, spec, views, strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return apply_views(decode_image(self.paths[i]), self.spec, self.views), ""
        except ImageDecodeError as exc:
            if self.strict:
                raise
            ch, cw = self.spec.crop_size
            return torch.zeros(len(self.views), 3, ch, cw, dtype=torch.uint8), str(exc)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


@torch.no_grad()
def predict_paths(model: torch.nn.Module, spec: PreprocessSpec, paths: list[str], views: list[TTAView],
                  merge: str = "mean", device: torch.device | str = "cpu", batch_size: int = 64,
                  workers: int = 0, strict: bool = False, amp_dtype=None,
                  progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Softmax probabilities merged over the TTA views: ((N, K) float32, per-image error or "").

    Rows of unreadable images are NaN (``strict=False``). ``batch_size`` counts images; each image
    contributes V views to the forward pass.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    normalize = Normalize(spec.mean, spec.std).to(device)
    loader = DataLoader(ViewsDataset(paths, spec, views, strict), batch_size=batch_size, shuffle=False,
                        num_workers=workers, persistent_workers=False)
    bar = _progress(len(paths), "predict", progress)
    out, errors = [], []
    for x, errs in loader:
        b, v = x.shape[:2]
        flat = normalize(x.flatten(0, 1).to(device, non_blocking=True))  # (B*V, 3, H, W)
        with autocast(device, amp_dtype):
            logits = model(flat)
        probs = torch.softmax(logits.float(), dim=1).view(b, v, -1).transpose(0, 1)  # (V, B, K)
        merged = merge_probs(probs, merge).cpu()
        bad = torch.tensor([bool(e) for e in errs])
        merged[bad] = float("nan")
        out.append(merged)
        errors.extend(errs)
        if bar is not None:
            bar.update(b)
    if bar is not None:
        bar.close()
    if not out:
        return np.zeros((0, 0), dtype=np.float32), []
    return torch.cat(out).numpy().astype(np.float32), list(errors)


def list_images(source: str | os.PathLike) -> list[str]:
    """A folder (searched recursively, sorted) or a list file (one path per line; an optional trailing
    label is ignored; relative paths are read from the list file's folder). Listed files that do not
    exist are kept: they become error rows."""
    src = Path(source)
    if src.is_dir():
        files = sorted(str(p) for p in src.rglob("*") if p.is_file() and is_image_file(p.name))
        if not files:
            raise MissingFileError(f"--images {src}: no image files ({', '.join(('.png', '.jpg', '...'))}) "
                                    "in this folder or below")
        return files
    if not src.is_file():
        raise MissingFileError(f"--images {src}: no such folder or list file")
    if is_image_file(src.name):
        return [str(src)]
    paths = []
    for raw in src.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path = line if os.path.isabs(line) else str(src.parent / line)
        if not os.path.exists(path) and len(line.rsplit(None, 1)) == 2:
            first = line.rsplit(None, 1)[0]  # "path label" as in train.txt
            path = first if os.path.isabs(first) else str(src.parent / first)
        paths.append(path)
    if not paths:
        raise MissingFileError(f"--images {src}: the list file names no images")
    return paths


def image_ids(paths: list[str]) -> list[str]:
    """The file name without extension; where two files share a name, their paths (without extension)
    relative to the common folder keep the ids unique."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = os.path.commonpath([os.path.abspath(p) for p in paths]) if len(paths) > 1 else ""
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    ids = []
    for p, s in zip(paths, stems):
        if seen[s] > 1:
            rel = os.path.relpath(os.path.abspath(p), common) if common else p
            s = os.path.splitext(rel)[0].replace(os.sep, "/")
        ids.append(s)
    return ids


@dataclass
class PredictionTable:
    ids: list[str]
    classes: list[str]
    probs: np.ndarray  # (N, K), NaN rows for errors
    errors: list[str] = field(default_factory=list)

    def write_csv(self, path: str | os.PathLike, topk: int = 1, save_probs: bool = False) -> None:
        k = len(self.classes)
        topk = max(1, min(topk, k))
        header = ["id", "label", "prob"]
        for j in range(2, topk + 1):
            header += [f"top{j}_label", f"top{j}_prob"]
        if save_probs:
            header += [f"prob_{c}" for c in self.classes]
        header.append("error")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for i, ident in enumerate(self.ids):
                err = self.errors[i] if self.errors else ""
                row: list = [ident]
                if err:
                    row += [""] * (2 * topk + (k if save_probs else 0))
                else:
                    p = self.probs[i]
                    # stable sort: equal probabilities keep class order (lowest index first)
                    order = np.argsort(-p, kind="stable")[:topk]
                    for j in order:
                        row += [self.classes[j], f"{p[j]:.6f}"]
                    if save_probs:
                        row += [f"{v:.6f}" for v in p]
                w.writerow(row + [err])
        os.replace(tmp, path)


def predict_checkpoint(checkpoint: str | os.PathLike, images: str | os.PathLike, tta: str = "none",
                       merge: str = "mean", device: str = "auto", batch_size: int = 64, workers: int = -1,
                       weights: str = "auto", amp: str = "none", progress: bool = True) -> PredictionTable:
    from .inference import model_from_checkpoint
    from .engine.runtime import default_workers, resolve_amp, resolve_device

    loaded = model_from_checkpoint(checkpoint, weights)
    paths = list_images(images)
    dev = resolve_device(device)
    probs, errors = predict_paths(loaded.model, loaded.preprocess, paths, parse_policy(tta), merge, dev,
                                  batch_size, default_workers(workers), amp_dtype=resolve_amp(amp, dev),
                                  progress=progress)
    for e in errors:
        if e:
            log.warning("unreadable image, written as an error row: %s", e)
    return PredictionTable(image_ids(paths), loaded.classes, probs, errors)
