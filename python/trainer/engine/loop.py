"""One training epoch and one validation pass over a ``LoopState``; used by ``engine.train.train``.

    python -m trainer train --data data/digits --model resnet18 --img-size 32 --epochs 15 --log-every 20

Metrics stay on the device and are read only every ``log_every`` batches and at the end of the epoch,
so a step does not wait for the GPU. The non-finite-loss check is agreed across ranks at those
points: every rank raises together instead of one rank leaving the others in a collective.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import bad_indices
from ..data.layout import DataError
from ..errors import DivergenceError
from .distributed import DistInfo, all_reduce_sum
from .evaluate import topk_correct
from .losses import smooth_targets, soft_cross_entropy
from .observe import EpochProgress
from .runtime import autocast


@dataclass
class LoopState:
    """Everything the epoch needs, and where the current epoch stands (saved for a mid-epoch resume)."""
    model: nn.Module                 # the bare model: weights, EMA, checkpoints
    net: nn.Module                   # what runs the forward pass (DDP-wrapped and/or compiled model)
    optimizer: torch.optim.Optimizer
    schedule: object                 # schedules.LRSchedule
    scaler: torch.amp.GradScaler
    mixer: object                    # mixing.BatchMixer
    normalize: nn.Module
    device: torch.device
    info: DistInfo
    num_classes: int
    epochs: int
    ema: object = None
    class_weights: torch.Tensor | None = None
    amp_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    accum_steps: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    max_steps: int | None = None
    log_every: int = 50
    distiller: object = None
    epoch: int = 0
    batch: int = 0                   # batches of ``epoch`` already done
    # loss sum, correct, seen, first non-finite batch (-1: none), on the device
    totals: torch.Tensor | None = None
    elapsed: float = 0.0             # seconds spent in this epoch before a resume
    first_batch_at: float | None = None  # time.perf_counter() when the run's first batch was loaded
    first_step_at: float | None = None   # ... and after its first optimizer step
    bad: list = field(default_factory=list)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batch, self.totals, self.elapsed, self.bad = epoch, 0, None, 0.0, []


def freeze_frozen_norms(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen (--freeze-backbone) keep their running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


def _check_finite(totals: torch.Tensor, st: LoopState) -> None:
    """Raise on every rank when any rank saw a non-finite loss (one all-reduce: a sync point)."""
    flag = (totals[3:4] >= 0).double()
    if bool(all_reduce_sum(flag, st.info).item()):
        where = int(totals[3]) + 1
        raise DivergenceError(f"the loss became non-finite at epoch {st.epoch + 1}"
                                 f"{f', batch {where}' if where > 0 else ' (on another rank)'}; lower --lr or "
                                 "enable --clip-grad")


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_epoch(st: LoopState, loader, say, quiet: bool = False) -> dict:
    """Train until the epoch ends or --max-steps is reached; returns the epoch's statistics with
    ``complete`` False when it stopped in the middle. ``st.bad`` gets the indices of unreadable samples."""
    st.net.train()
    freeze_frozen_norms(st.model)
    n_batches = st.batch + len(loader)
    progress = EpochProgress(n_batches, st.epoch, st.epochs, enabled=not quiet, done=st.batch)
    if st.totals is None:
        st.totals = torch.tensor([0.0, 0.0, 0.0, -1.0], dtype=torch.float64, device=st.device)
    totals = st.totals
    accum = st.accum_steps
    t0, batch0, log_t = time.perf_counter(), st.batch, time.perf_counter()
    seen = log_seen = 0   # this rank's images since the epoch (re)started, counted on the CPU
    st.optimizer.zero_grad(set_to_none=True)
    lr = st.schedule.apply(st.optimizer)
    complete = True
    for x, y in loader:
        if st.first_batch_at is None:
            st.first_batch_at = time.perf_counter()
        i = st.batch
        bad = y < 0   # labels are on the CPU here: no device sync
        if bad.any():
            st.bad += bad_indices(y)
            if int((~bad).sum()) < 2:
                raise DataError(f"batch {i + 1} of epoch {st.epoch + 1} has fewer than 2 readable images; the "
                                "dataset has too many damaged files: run 'python -m trainer check-data'")
            x, y = x[~bad], y[~bad]
        x = st.normalize(x.to(st.device, non_blocking=True)).contiguous(memory_format=st.memory_format)
        y = y.to(st.device, non_blocking=True)
        targets = smooth_targets(y, st.num_classes, st.label_smoothing)
        x, targets = st.mixer(x, targets)
        # the last group of an epoch may hold fewer than accum batches: average over what it holds
        group_start = i // accum * accum
        group = min(accum, n_batches - group_start)
        last_in_step = i + 1 == group_start + group
        sync_ctx = st.net.no_sync() if (st.info.enabled and not last_in_step) else nullcontext()
        with sync_ctx:
            with autocast(st.device, st.amp_dtype):
                logits = st.net(x)
            if st.distiller is None:
                loss = soft_cross_entropy(logits, targets, st.class_weights)
            else:
                loss = st.distiller.loss(logits, targets, x, st.class_weights)
            st.scaler.scale(loss / group).backward()
        if last_in_step:
            if st.clip_grad:
                st.scaler.unscale_(st.optimizer)
                torch.nn.utils.clip_grad_norm_(st.model.parameters(), st.clip_grad)
            st.scaler.step(st.optimizer)
            st.scaler.update()
            st.optimizer.zero_grad(set_to_none=True)
            if st.ema is not None:
                st.ema.update(st.model)
            st.schedule.advance()
            lr = st.schedule.apply(st.optimizer)
            if st.first_step_at is None:
                st.first_step_at = time.perf_counter()
        with torch.no_grad():
            loss_d = loss.detach().double()
            totals[0] += loss_d * y.shape[0]
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += y.shape[0]
            totals[3] = torch.where((totals[3] < 0) & ~torch.isfinite(loss_d), float(i), totals[3])
        st.batch += 1
        seen += y.shape[0]
        progress.update(1)
        stop = bool(st.max_steps) and last_in_step and st.schedule.step >= st.max_steps
        if st.batch % st.log_every == 0 or stop:
            _check_finite(totals, st)
            t = all_reduce_sum(totals[:3].clone(), st.info).tolist()
            now = time.perf_counter()
            ips = (seen - log_seen) * st.info.world_size / max(now - log_t, 1e-9)
            log_t, log_seen = now, seen
            rate = (st.batch - batch0) / max(now - t0, 1e-9)
            left = (n_batches - st.batch) + n_batches * (st.epochs - st.epoch - 1)
            line = (f"epoch {st.epoch + 1}/{st.epochs} batch {st.batch}/{n_batches}  loss {t[0] / max(t[2], 1):.4f}"
                    f"  train {t[1] / max(t[2], 1):.4f}  lr {lr:.2e}  {ips:.0f} img/s  ETA epoch "
                    f"{_eta((n_batches - st.batch) / rate)} run {_eta(left / rate)}")
            if progress.bar is not None:
                progress.describe(line)
            elif not quiet and not sys.stdout.isatty():
                say(line)  # under nohup or a scheduler: a line every --log-every batches
        if stop:
            complete = st.batch == n_batches
            break
    st.elapsed += time.perf_counter() - t0
    _check_finite(totals, st)
    t = all_reduce_sum(totals[:3].clone(), st.info).tolist()
    progress.close()
    return {"train_loss": t[0] / max(t[2], 1), "train_top1": t[1] / max(t[2], 1), "lr": lr,
            "images_per_sec": t[2] / max(st.elapsed, 1e-9), "epoch_seconds": st.elapsed, "complete": complete}


@torch.no_grad()
def validate(model: nn.Module, loader, st: LoopState, class_weights: torch.Tensor | None = None) -> dict:
    """Loss (weighted by ``class_weights`` as in training when given), top-1, top-5 and count, over all
    ranks. Returns ``bad``: indices of unreadable samples, left out of every figure."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=st.device)   # loss, c1, c5, n, weight sum
    k = None
    bad: list[int] = []
    for x, y in loader:
        y = torch.as_tensor(y)
        broken = y < 0
        if broken.any():
            bad += bad_indices(y)
            x, y = x[~broken], y[~broken]
            if not len(y):
                continue
        x = st.normalize(x.to(st.device, non_blocking=True)).contiguous(memory_format=st.memory_format)
        y = y.to(st.device, non_blocking=True)
        with autocast(st.device, st.amp_dtype):
            logits = model(x)
        logits = logits.float()
        k = logits.shape[1]
        totals[0] += F.cross_entropy(logits, y, weight=class_weights, reduction="sum")
        totals[1] += topk_correct(logits, y, 1)
        totals[2] += topk_correct(logits, y, 5)
        totals[3] += y.shape[0]
        totals[4] += class_weights[y].sum() if class_weights is not None else y.shape[0]
    t = all_reduce_sum(totals, st.info).tolist()
    count = max(t[3], 1.0)
    out = {"loss": t[0] / max(t[4], 1e-12), "top1": t[1] / count, "count": int(t[3]), "bad": bad}
    if k is not None and k > 5:
        out["top5"] = t[2] / count
    return out
