"""The one-machine engine: decoding in DataLoader worker processes, the model in this process.

Workers run ``PredictPlan.preprocess`` (decode, resize, TTA views) on ``batch_size`` paths at a time and
send back uint8 crops; the main process runs the model on each batch as it arrives, in order, while the
workers decode the next ones (``prefetch_factor`` batches ahead each). On 2 cores the decoding of
real-sized photos, not the model, is what a plain loop spends its time on: benchmarks/batch.py.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from torch.utils.data import DataLoader, Dataset

from .plan import PredictPlan, collate

log = logging.getLogger("batch")


class PathDataset(Dataset):
    """paths -> (path, per-member crops, error or "")."""

    def __init__(self, paths: list[str], plan: PredictPlan):
        self.paths, self.plan = paths, plan

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        crops, error = self.plan.preprocess(self.paths[i])
        return self.paths[i], crops, error


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_embedded(opts, identity, pending: list[str], sink) -> None:
    from .job import load_checked

    bundle = load_checked(opts, identity, opts.threads)
    plan = PredictPlan.of(bundle)
    workers = cpu_cores() if opts.workers < 0 else opts.workers
    log.info("batch: %d images to classify with %s (backend %s), %d decode worker(s), batches of %d",
             len(pending), identity.bundle_name, bundle.backend, workers, opts.batch_size)
    loader = DataLoader(PathDataset(pending, plan), batch_size=opts.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, persistent_workers=False)
    for paths, crops, errors in loader:  # crops[m]: (B, V, 3, h, w) uint8
        ok = np.array([not e for e in errors], dtype=bool)
        sink.add(list(paths), plan.predict(bundle, crops, ok), list(errors))
