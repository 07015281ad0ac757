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

    ``transform`` receives a (3, H, W) uint8 tensor. An unreadable file raises ImageDecodeError
    naming it, unless ``mark_bad``: then the sample comes back as a blank image with the label
    ``bad_label(index)`` (negative), so the training loop leaves it out of the batch and reports
    the file by path at the end of the epoch. A bad file is never replaced by another sample.
    """

    def __init__(self, samples: list[tuple[str, int]], transform=None, eval_spec: PreprocessSpec | None = None,
                 mark_bad: bool = False, cache: list | None = None, blank_size: int = 0):
        if transform is None and eval_spec is None:
            raise ValueError("give a train transform or an eval PreprocessSpec")
        self.samples = samples
        self.transform = transform
        self.eval_spec = eval_spec
        self.mark_bad = mark_bad
        self.blank_size = blank_size  # the train transform's output size, for the stand-in of a bad file
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

    def _blank(self) -> torch.Tensor:
        h, w = self.eval_spec.crop_size if self.eval_spec is not None else (self.blank_size, self.blank_size)
        return torch.zeros(3, h, w, dtype=torch.uint8)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        try:
            if seed is None:
                return self._load(index), self.samples[index][1]
            # A private RNG stream per sample, without disturbing the caller's: with workers=0 the
            # loop's own draws (mixup, cutmix) must not depend on which sample came last.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._load(index), self.samples[index][1]
        except ImageDecodeError as exc:
            if not self.mark_bad:
                raise
            log.warning("unreadable image (left out, reported at the end of the epoch): %s", exc)
            return self._blank(), bad_label(index)


def bad_label(index: int) -> int:
    """The label that marks sample ``index`` as unreadable (always negative)."""
    return -1 - index


def bad_indices(labels: torch.Tensor) -> list[int]:
    return [-1 - int(v) for v in labels[labels < 0].tolist()]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, without the collisions of seed*7+epoch-style sums."""
    import numpy as np

    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    return mix_seed(run_seed, epoch, index)


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
        self.skip = 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip``: samples of this rank's share already trained on (resuming in the middle of an epoch)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / len(order)))[:total]
        for i in order[self.rank:total:self.world][self.skip:]:
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
