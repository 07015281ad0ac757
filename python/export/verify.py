"""Parity between an artifact and eager PyTorch (or another artifact), and top-1 on labelled images.

    report = check_parity(eager, open_runtime("model.onnx", "onnx"), images, "onnx", tol=1e-4)

A failure raises ParityError naming the format, the batch size and how far off it was.
"""
from __future__ import annotations

import torch

from .formats import Runtime


class ParityError(RuntimeError):
    """An exported artifact does not reproduce eager PyTorch; nothing was written."""


def parity_batch_sizes(max_batch: int) -> list[int]:
    """1, 2 and an odd size above 2 (5, or 3 when max_batch is 3 or 4), capped at max_batch."""
    odd = 5 if max_batch >= 5 else 3
    return [b for b in (1, 2, odd) if b <= max_batch]


def _batch(images: torch.Tensor, n: int) -> torch.Tensor:
    if images.shape[0] >= n:
        return images[:n]
    reps = -(-n // images.shape[0])
    return images.repeat(reps, 1, 1, 1)[:n]


def check_parity(reference: Runtime, candidate: Runtime, images: torch.Tensor, name: str, max_batch: int,
                 tol: float | None = 1e-4, source: str = "") -> dict:
    """Compare probabilities at batch sizes 1, 2 and an odd size; raise ParityError when tol is exceeded.

    tol=None only measures (int8 artifacts are judged by top-1 on the validation set instead).
    """
    sizes = parity_batch_sizes(max_batch)
    worst, agree_all, per_size = 0.0, True, {}
    for bs in sizes:
        x = _batch(images, bs)
        ref = reference(x).float()
        got = candidate(x).float()
        if tuple(got.shape) != tuple(ref.shape):
            raise ParityError(f"{name}: batch size {bs}: output shape {tuple(got.shape)} differs from eager's "
                              f"{tuple(ref.shape)}")
        diff = float((ref - got).abs().max())
        agree = bool((ref.argmax(-1) == got.argmax(-1)).all())
        per_size[str(bs)] = diff
        worst, agree_all = max(worst, diff), agree_all and agree
        if tol is not None and (not diff <= tol or not agree):  # "not <=" also catches NaN
            flipped = int((ref.argmax(-1) != got.argmax(-1)).sum())
            raise ParityError(f"{name}: parity check failed at batch size {bs} on {source or 'the check images'}: "
                              f"max abs probability difference {diff:.3g} (allowed {tol:g}), top-1 differs for "
                              f"{flipped} of {bs} image(s). The artifact was not written; report this with the "
                              "model name, or export other formats (--format).")
    return {"max_abs_diff": worst, "batch_sizes": sizes, "top1_agree": agree_all, "per_batch_size": per_size,
            "images": source}


def run_chunked(run: Runtime, images: torch.Tensor, max_batch: int) -> torch.Tensor:
    outs = [run(images[i:i + max_batch]) for i in range(0, images.shape[0], max_batch)]
    return torch.cat(outs) if outs else torch.empty(0)


def top1(run: Runtime, images: torch.Tensor, labels: list[int], max_batch: int) -> float:
    probs = run_chunked(run, images, max_batch)
    return int((probs.argmax(-1) == torch.tensor(labels)).sum()) / len(labels)
