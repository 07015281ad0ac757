"""The training engine: one function, ``train(cfg)``, used by the CLI and by torchrun.

    python -m trainer train --data data/digits --model resnet18 --img-size 32 --epochs 15 --out runs/digits
    torchrun --nproc_per_node 2 -m trainer train ...
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..config import TrainConfig, write_config
from ..data import (AugmentConfig, DataError, EvalShardSampler, ImageSamples, Normalize, PreprocessSpec,
                    SeededShuffleSampler, build_train_transform, discover_dataset)
from ..data.images import decode_all
from ..data.dataset import seed_worker
from ..models import create_model, get_spec, load_pretrained, set_backbone_trainable
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from .ema import ModelEMA
from .evaluate import topk_correct
from .losses import balanced_class_weights, smooth_targets, soft_cross_entropy
from .mixing import BatchMixer
from .observe import EpochProgress, MetricsLog
from .optim import build_optimizer
from .runtime import autocast, default_workers, resolve_amp, resolve_device, seed_everything, set_deterministic
from .schedules import LRSchedule

log = logging.getLogger("trainer")


class TrainingStopped(Exception):
    pass


def _versions() -> dict:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": sys.version.split()[0]}


CACHE_BUDGETS = {"off": 0, "auto": 1 << 30, "on": 1 << 62}


def _check_images(splits, cfg: TrainConfig, out: Path, say, is_main: bool = True):
    """Decode every image once before training; 'error' lists all bad files, 'skip' drops them.

    Small datasets stay decoded in memory for the whole run (--cache-images). Returns
    (train samples, val samples, train cache or None, val cache or None).
    """
    samples = splits.train + splits.val
    cache, bad = decode_all([p for p, _ in samples], CACHE_BUDGETS[cfg.cache_images])
    if bad and cfg.on_bad_image == "error":
        listing = "\n  ".join(bad)
        raise DataError(f"{len(bad)} unreadable image(s); nothing was trained:\n  {listing}\n"
                        "Fix or delete them, or pass --on-bad-image skip to leave them out.")
    if bad and is_main:
        (out / "bad_images.txt").write_text("\n".join(bad) + "\n", encoding="utf-8")
        say(f"skipping {len(bad)} unreadable image(s) (listed in {out / 'bad_images.txt'})")
    bad_paths = {b.split(": ", 1)[0] for b in bad}
    keep = [i for i, (p, _) in enumerate(samples) if p not in bad_paths]
    n_train = len(splits.train)
    tr = [i for i in keep if i < n_train]
    va = [i for i in keep if i >= n_train]
    pick = (lambda idx: [cache[i] for i in idx]) if cache is not None else (lambda idx: None)
    return [samples[i] for i in tr], [samples[i] for i in va], pick(tr), pick(va)


def train(cfg: TrainConfig, distiller=None) -> dict:
    """Train, validate every epoch, checkpoint, and (rank 0) write the final report. Returns summary.

    ``distiller`` (engine.distill.Distiller) replaces the loss by the distillation loss."""
    cfg = cfg.with_preprocessing_defaults()  # unset input size, crop, mean/std: the named weights' own
    device = resolve_device(cfg.device)
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    quiet = cfg.quiet or not info.is_main

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    try:
        return _train(cfg, device, info, say, quiet, distiller)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, device: torch.device, info: DistInfo, say, quiet: bool, distiller=None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_deterministic(cfg.deterministic)
    out = Path(cfg.out)
    resume_ckpt = None
    if cfg.resume:
        resume_ckpt = load_checkpoint(Path(cfg.resume) / "last.pt")
        out = Path(cfg.resume)
    elif (out / "last.pt").exists() and not cfg.overwrite:
        raise DataError(f"'{out}' already holds a run (last.pt); continue it with --resume {out}, choose another "
                        "--out, or pass --overwrite to start over there")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_ckpt is None:
            for stale in ("metrics.jsonl", "summary.json", "bad_images.txt"):
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        write_config(cfg, out / "config.yaml")
    barrier(info)

    # ---- data
    splits = discover_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    for note in splits.notes:
        say(f"note: {note}")
    classes = splits.classes
    if resume_ckpt is not None and resume_ckpt["classes"] != classes:
        raise DataError(f"the data's classes {classes} differ from the resumed run's {resume_ckpt['classes']}")
    train_samples, val_samples, train_cache, val_cache = _check_images(splits, cfg, out, say, info.is_main)
    if not val_samples:
        raise DataError("no validation images; add a validation split or pass --val-fraction")
    spec = get_spec(cfg.model)
    pre = PreprocessSpec.for_size(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    aug = AugmentConfig(cfg.img_size, cfg.scale_min, hflip=cfg.hflip, vflip=cfg.vflip,
                        auto_augment=cfg.auto_augment, random_erasing=cfg.random_erasing,
                        interpolation=cfg.interpolation)
    workers = default_workers(cfg.workers)
    train_ds = ImageSamples(train_samples, transform=build_train_transform(aug),
                            skip_bad=cfg.on_bad_image == "skip", cache=train_cache)
    val_ds = ImageSamples(val_samples, eval_spec=pre, skip_bad=cfg.on_bad_image == "skip", cache=val_cache)
    labels = [lbl for _, lbl in train_samples]
    sample_weights = None
    if cfg.balanced_sampler:
        cw = balanced_class_weights(labels, len(classes))
        sample_weights = cw[torch.tensor(labels)].double()
    train_sampler = SeededShuffleSampler(len(train_ds), cfg.seed, info.rank, info.world_size,
                                         weights=sample_weights)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                     persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=False,
                              **loader_kw)
    val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 64),
                            sampler=EvalShardSampler(len(val_ds), info.rank, info.world_size), **loader_kw)

    # ---- model
    seed_everything(cfg.seed)
    model = create_model(cfg.model, len(classes), cfg.img_size)
    if cfg.pretrained and resume_ckpt is None:
        report = load_pretrained(model, spec, cfg.pretrained)
        say(f"pretrained {cfg.pretrained}: {report}")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    normalize = Normalize(cfg.mean, cfg.std).to(device)
    amp_dtype = resolve_amp(cfg.amp, device)
    if distiller is not None:
        distiller.prepare(classes, device, cfg, amp_dtype)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov,
                                fused=amp_dtype != torch.float16)
    schedule = LRSchedule(cfg.scheduler, cfg.lr, total_steps, int(round(cfg.warmup_epochs * steps_per_epoch)),
                          cfg.warmup_lr, cfg.min_lr, [int(m * steps_per_epoch) for m in cfg.milestones],
                          cfg.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
    class_weights = balanced_class_weights(labels, len(classes)).to(device) if cfg.class_weights == "auto" else None
    mixer = BatchMixer(len(classes), cfg.mixup, cfg.cutmix, cfg.mix_prob)

    start_epoch, best, best_epoch, best_source = 0, -1.0, -1, "model"
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        schedule.load_state_dict(resume_ckpt["schedule"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        if ema is not None and resume_ckpt.get("ema"):
            ema.load_state_dict(resume_ckpt["ema"])
        start_epoch = resume_ckpt["epoch"]
        best, best_epoch = resume_ckpt["best_metric"], resume_ckpt["best_epoch"]
        best_source = resume_ckpt.get("best_source", "model")
        set_rng_state(resume_ckpt["rng"])
        say(f"resumed {cfg.resume} at epoch {start_epoch} (step {schedule.step})")

    metrics_log = MetricsLog(out, enabled=info.is_main)
    say(f"{cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}"
        f"{f' x{info.world_size}' if info.enabled else ''}, {len(classes)} classes, {len(train_samples)} train / "
        f"{len(val_samples)} val images ({splits.layout}), amp={amp_dtype}, channels_last={cfg.channels_last}, "
        f"workers={workers}")

    ddp_model = None
    frozen_state = None
    t_train = time.perf_counter()
    epochs_run = 0
    stopped_early = False
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        frozen = cfg.freeze_backbone and (cfg.unfreeze_at is None or epoch < cfg.unfreeze_at)
        if frozen != frozen_state:
            set_backbone_trainable(model, spec, not frozen)
            frozen_state = frozen
            # DDP records which parameters need gradients when it is built: rebuild on change.
            ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
                if info.enabled else model
        seed_everything(cfg.seed + 1000 * epoch + info.rank)
        train_sampler.set_epoch(epoch)
        stats = _train_one_epoch(ddp_model, model, train_loader, optimizer, schedule, scaler, ema, mixer,
                                 normalize, class_weights, cfg, device, amp_dtype, memory_format, info,
                                 epoch, quiet, len(classes), distiller)
        val = _validate(model, val_loader, normalize, device, amp_dtype, memory_format, info, class_weights)
        record = {"epoch": epoch + 1, **stats, **{f"val_{k}": v for k, v in val.items()}}
        candidates = {"model": val["top1"]}
        if ema is not None:
            ema_val = _validate(ema.module, val_loader, normalize, device, amp_dtype, memory_format, info, None)
            record.update({f"ema_val_{k}": v for k, v in ema_val.items()})
            candidates["ema"] = ema_val["top1"]
        source, metric = max(candidates.items(), key=lambda kv: (kv[1], kv[0] == "model"))
        improved = metric > best
        if improved:
            best, best_epoch, best_source = metric, epoch + 1, source
        record.update(best_top1=best, best_epoch=best_epoch, time=time.time())
        metrics_log.write(record)
        epochs_run += 1
        say(EpochProgress.summary_line(record, cfg.epochs, ema is not None))
        if info.is_main:
            ckpt = _checkpoint(cfg, model, optimizer, schedule, scaler, ema, epoch + 1, best, best_epoch,
                               best_source, classes, pre, record, splits.layout, distiller)
            atomic_save(ckpt, out / "last.pt")
            if improved:
                _link_or_copy(out / "last.pt", out / "best.pt")
        barrier(info)
        if cfg.patience is not None and epoch + 1 - best_epoch >= cfg.patience:
            say(f"early stop: no better validation top-1 for {cfg.patience} epoch(s)")
            stopped_early = True
            break
        if cfg.max_steps and schedule.step >= cfg.max_steps:
            break
    train_seconds = time.perf_counter() - t_train

    summary = {"model": cfg.model, "classes": classes, "best_top1": best, "best_epoch": best_epoch,
               "best_source": best_source, "epochs_run": epochs_run, "stopped_early": stopped_early,
               "train_seconds": round(train_seconds, 2), "run_dir": str(out),
               "best_checkpoint": str(out / "best.pt"), "last_checkpoint": str(out / "last.pt"),
               "world_size": info.world_size, "device": str(device),
               "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none"}
    if info.is_main and epochs_run:
        metrics_log.finish()
        from ..evaluate_cli import evaluate_checkpoint

        report = evaluate_checkpoint(out / "best.pt", samples=val_samples, out_dir=out / "report",
                                     device=device, batch_size=max(cfg.batch_size, 64), workers=workers)
        summary["report"] = {"top1": report["top1"], "top5": report["top5"], "macro_f1": report["macro_f1"],
                             "dir": str(out / "report")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _checkpoint(cfg, model, optimizer, schedule, scaler, ema, epoch, best, best_epoch, best_source, classes,
                pre, record, layout, distiller=None) -> dict:
    return {
        "distill": distiller.describe() if distiller is not None else None,
        "format": CHECKPOINT_FORMAT,
        "arch": cfg.model,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": pre.to_dict(),
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": schedule.step,
        "best_metric": best,
        "best_epoch": best_epoch,
        "best_source": best_source,
        "metrics": record,
        "data_layout": layout,
        "rng": rng_state(),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _train_one_epoch(ddp_model, model, loader, optimizer, schedule, scaler, ema, mixer, normalize,
                     class_weights, cfg, device, amp_dtype, memory_format, info, epoch, quiet, num_classes,
                     distiller=None):
    ddp_model.train()
    progress = EpochProgress(len(loader), epoch, cfg.epochs, enabled=not quiet)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = seen = 0
    t0 = time.perf_counter()
    accum = cfg.accum_steps
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    lr = schedule.apply(optimizer)
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        x = normalize(x).contiguous(memory_format=memory_format)
        targets = smooth_targets(y, num_classes, cfg.label_smoothing)
        x, targets = mixer(x, targets)
        last_in_step = (i + 1) % accum == 0 or i + 1 == n_batches
        sync_ctx = ddp_model.no_sync() if (info.enabled and not last_in_step) else nullcontext()
        with sync_ctx:
            with autocast(device, amp_dtype):
                logits = ddp_model(x)
            if distiller is None:
                loss = soft_cross_entropy(logits, targets, class_weights)
            else:
                loss = distiller.loss(logits, targets, x, class_weights)
            scaler.scale(loss / accum).backward()
        if last_in_step:
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            schedule.advance()
            lr = schedule.apply(optimizer)
        with torch.no_grad():
            loss_sum += loss.detach().double().cpu() * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}, batch {i + 1}; lower --lr "
                                     "or enable --clip-grad")
        progress.update(y.shape[0], float(loss.detach()), correct / max(seen, 1), lr)
        if cfg.max_steps and schedule.step >= cfg.max_steps:
            break
    elapsed = time.perf_counter() - t0
    totals = all_reduce_sum(torch.tensor([float(loss_sum), correct, seen], dtype=torch.float64), info)
    progress.close()
    return {"train_loss": float(totals[0] / max(totals[2], 1)), "train_top1": float(totals[1] / max(totals[2], 1)),
            "lr": lr, "images_per_sec": float(totals[2]) / elapsed, "epoch_seconds": elapsed}


@torch.no_grad()
def _validate(model, loader, normalize, device, amp_dtype, memory_format, info, class_weights) -> dict:
    model.eval()
    loss_sum = 0.0
    c1 = c5 = n = 0
    k = None
    for x, y in loader:
        x = normalize(x.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        y = torch.as_tensor(y).to(device)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        k = logits.shape[1]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        c1 += topk_correct(logits, y, 1)
        c5 += topk_correct(logits, y, 5)
        n += y.shape[0]
    totals = all_reduce_sum(torch.tensor([loss_sum, c1, c5, n], dtype=torch.float64), info)
    count = max(float(totals[3]), 1.0)
    out = {"loss": float(totals[0]) / count, "top1": float(totals[1]) / count, "count": int(totals[3])}
    if k is not None and k > 5:
        out["top5"] = float(totals[2]) / count
    return out
