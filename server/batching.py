"""Batch -> predict -> unbatch, independent of the queue that carries the jobs.

A job is one HTTP request: ``n_images`` images with ``n_views`` TTA views each, stored as one
(n_images * n_views, 3, H, W) uint8 block (image-major). A batch is several jobs of one model; it
is concatenated, run through ``predict`` in chunks of at most ``max_rows`` rows, split back, and
each job's views are merged with ``trainer.tta.merge_probs``.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from trainer.tta import merge_probs

PredictFn = Callable[[np.ndarray], np.ndarray]   # (N, 3, H, W) uint8 -> (N, K) float32 probabilities
# (or (M, N, K) for an M-member ensemble, with a CombineFn that fuses the members' (n, K) results)
CombineFn = Callable[[list[np.ndarray]], np.ndarray]


@dataclass
class Job:
    model: str
    pixels: np.ndarray            # (n_images * n_views, 3, H, W) uint8, image-major
    n_images: int
    n_views: int = 1
    merge: str = "mean"
    deadline: float = 0.0         # time.time() after which nobody waits for the answer
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued: float = field(default_factory=time.time)
    request_id: str = ""          # the HTTP request's X-Request-ID, carried into logs (and Redis jobs)
    model_version: str = ""       # the version the front expects; a Redis worker holding another refuses it
    bundle_checksum: str = ""     # and the bundle (sha256 of its manifest.json): the same version rebuilt differs

    @property
    def rows(self) -> int:
        return self.pixels.shape[0]

    def expired(self, now: float | None = None) -> bool:
        return self.deadline > 0 and (now or time.time()) > self.deadline


@dataclass
class BatchResult:
    probs: np.ndarray             # (n_images, K) float32, views merged
    batch_rows: int               # rows in the batch that served this job
    queue_s: float                # enqueue -> batch start
    infer_s: float                # the batch's model time


def stack_rows(jobs: list[Job]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([j.pixels for j in jobs], axis=0))


def predict_rows(predict: PredictFn, x: np.ndarray, max_rows: int) -> np.ndarray:
    """Run predict over (N, 3, H, W) in chunks of max_rows; (N, K) (or (M, N, K)) float32."""
    outs = [np.asarray(predict(x[i:i + max_rows]), dtype=np.float32) for i in range(0, x.shape[0], max_rows)]
    out = np.concatenate(outs, axis=-2)
    if out.shape[-2] != x.shape[0]:
        raise RuntimeError(f"model returned {out.shape[0]} rows for {x.shape[0]} inputs")
    return out


def merge_views(probs: np.ndarray, n_images: int, n_views: int, merge: str) -> np.ndarray:
    """(n_images * n_views, K) image-major -> (n_images, K)."""
    if n_views == 1:
        return probs
    k = probs.shape[-1]
    per_view = torch.from_numpy(np.ascontiguousarray(probs).reshape(n_images, n_views, k)).transpose(0, 1)  # (V, N, K)
    return merge_probs(per_view, merge).numpy().astype(np.float32)


def run_batch(jobs: list[Job], predict: PredictFn, max_rows: int = 64,
              combine: CombineFn | None = None) -> list[BatchResult]:
    """One batched inference for several jobs; results in job order."""
    start = time.time()
    x = stack_rows(jobs)
    probs = predict_rows(predict, x, max_rows)
    infer_s = time.time() - start
    results, offset = [], 0
    for j in jobs:
        part = probs[..., offset:offset + j.rows, :]
        offset += j.rows
        if part.ndim == 3:   # ensemble: merge each member's views, then fuse (as export's loader does)
            merged = np.asarray(combine([merge_views(p, j.n_images, j.n_views, j.merge) for p in part]), np.float32)
        else:
            merged = merge_views(part, j.n_images, j.n_views, j.merge)
        results.append(BatchResult(merged, x.shape[0],
                                   max(0.0, start - j.enqueued), infer_s))
    return results


def topk(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    """Encode step: (n_images, K) -> one {labels, indices, probabilities} per image, best first."""
    k = min(k, probs.shape[-1])
    out = []
    for row in probs:
        idx = np.argsort(-row, kind="stable")[:k]
        out.append({"labels": [classes[i] for i in idx], "indices": [int(i) for i in idx],
                    "probabilities": [float(row[i]) for i in idx]})
    return out
