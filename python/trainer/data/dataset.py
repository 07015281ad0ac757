"""Datasets and samplers that keep augmentation reproducible across resumes and worker counts.

The sampler yields ``(index, seed)`` pairs; the dataset seeds torch's RNG with that seed before
augmenting the sample. An epoch's augmentations therefore depend only on (run seed, epoch, index),
not on which worker handled the sample, whether workers persisted, or whether the run was resumed.
"""
from __future__ import annotations

import logging
import math
import random

import torch
from torch.utils.data import Dataset, Sampler

from .images import ImageDecodeError, decode_image
from .transforms import PreprocessSpec, eval_transform, hwc_to_chw

log = logging.getLogger(__name__)


class ImageSamples(Dataset):
    """(path, label) samples -> ((3, H, W) uint8 tensor, label).

    ``transform`` receives a (3, H, W) uint8 tensor. With ``skip_bad`` an unreadable file is
    logged once and replaced by another sample (chosen deterministically); otherwise it raises
    ImageDecodeError naming the file.
    """

    def __init__(self, samples: list[tuple[str, int]], transform=None, eval_spec: PreprocessSpec | None = None,
                 skip_bad: bool = False, cache: list | None = None):
        if transform is None and eval_spec is None:
            raise ValueError("give a train transform or an eval PreprocessSpec")
        self.samples = samples
        self.transform = transform
        self.eval_spec = eval_spec
        self.skip_bad = skip_bad
        # decoded (H, W, 3) uint8 arrays in sample order, shared copy-on-write with forked workers
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> torch.Tensor:
        path, _ = self.samples[index]
        arr = self.cache[index] if self.cache is not None and self.cache[index] is not None else decode_image(path)
        if self.eval_spec is not None:
            return eval_transform(arr, self.eval_spec)
        return self.transform(hwc_to_chw(arr))

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        for attempt in range(10):
            if seed is not None:
                torch.default_generator.manual_seed(seed + attempt)
            try:
                return self._load(index), self.samples[index][1]
            except ImageDecodeError as exc:
                if not self.skip_bad:
                    raise
                log.warning("skipping unreadable image: %s", exc)
                index = (index * 7919 + 1) % len(self.samples)
        raise ImageDecodeError("too many unreadable images in a row; check the dataset")


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    return (run_seed * 1_000_003 + epoch * 100_003 + index) % (2**63 - 1)


class SeededShuffleSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch); shards across ranks for DDP.

    Training shards are padded (as DistributedSampler does) so every rank runs the same number of
    steps; use ``EvalShardSampler`` for evaluation, which never duplicates a sample.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 weights: torch.Tensor | None = None):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.shuffle, self.weights = shuffle, weights
        self.epoch = 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / len(order)))[:total]
        for i in order[self.rank:total:self.world]:
            yield (i, sample_seed(self.seed, self.epoch, i))


class EvalShardSampler(Sampler):
    """Rank r gets indices r, r+W, r+2W, ...: every sample exactly once across ranks."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def seed_worker(worker_id: int) -> None:
    """Keep python's and numpy's RNGs distinct per worker (torch's is seeded per sample)."""
    import numpy as np

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
