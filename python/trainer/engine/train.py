"""The training engine: one function, ``train(cfg)``, used by the CLI and by torchrun.

    python -m trainer train --data data/digits --model resnet18 --img-size 32 --epochs 15 --out runs/digits
    torchrun --nproc_per_node 2 -m trainer train ...
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..config import TrainConfig, write_config
from ..data import (AugmentConfig, DataError, EvalShardSampler, ImageSamples, Normalize, PreprocessSpec,
                    SeededShuffleSampler, build_train_transform, discover_dataset)
from ..data.dataset import mix_seed, seed_worker
from ..data.images import decode_all
from ..data.index import build_index
from ..errors import UserError
from ..models import create_model, get_spec, load_pretrained, set_backbone_trainable
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from .distributed import DistInfo, barrier, cleanup, gather_objects, init_distributed
from .ema import ModelEMA
from .loop import LoopState, train_epoch, validate
from .losses import balanced_class_weights
from .mixing import BatchMixer
from .observe import EpochProgress, MetricsLog
from .optim import build_optimizer
from .runtime import default_workers, resolve_amp, resolve_device, seed_everything, set_deterministic
from .schedules import LRSchedule

log = logging.getLogger("trainer")


class TrainingStopped(Exception):
    pass


def _versions() -> dict:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": sys.version.split()[0]}


CACHE_BUDGETS = {"off": 0, "auto": 1 << 30, "on": 1 << 62}


def _check_images(splits, cfg: TrainConfig, out: Path, say, info: DistInfo):
    """Check every image's header (cached across runs, split across ranks): 'error' lists all bad
    files, 'skip' drops them. Pixels are decoded up front only to fill the --cache-images cache.

    Returns (train samples, val samples, train cache or None, val cache or None).
    """
    samples = splits.train + splits.val
    paths = [p for p, _ in samples]
    gather = (lambda obj: gather_objects(obj, info)) if info.enabled else None
    index = build_index(cfg.data, paths, info.rank, info.world_size, gather)
    bad = index.bad(paths)
    if bad and cfg.on_bad_image == "error":
        listing = "\n  ".join(bad)
        raise DataError(f"{len(bad)} unreadable image(s); nothing was trained:\n  {listing}\n"
                        "Fix or delete them, or pass --on-bad-image skip to leave them out.")
    if bad:
        _report_bad(bad, out, say, info, "skipping")
    bad_paths = {b.split(": ", 1)[0] for b in bad}
    keep = [i for i, (p, _) in enumerate(samples) if p not in bad_paths]
    n_train = len(splits.train)
    tr = [i for i in keep if i < n_train]
    va = [i for i in keep if i >= n_train]
    cache = None
    if index.decoded_bytes([paths[i] for i in keep]) <= CACHE_BUDGETS[cfg.cache_images]:
        # damaged pixels behind a good header: not cached here, reported by the loop when met
        cache, _ = decode_all([paths[i] for i in keep], CACHE_BUDGETS[cfg.cache_images])
    pos = {i: j for j, i in enumerate(keep)}

    def pick(idx):
        return [cache[pos[i]] for i in idx] if cache is not None else None

    return [samples[i] for i in tr], [samples[i] for i in va], pick(tr), pick(va)


def _report_bad(bad: list[str], out: Path, say, info: DistInfo, what: str) -> None:
    if info.is_main:
        with open(out / "bad_images.txt", "a", encoding="utf-8") as fh:
            fh.write("\n".join(bad) + "\n")
    say(f"{what} {len(bad)} unreadable image(s) (listed in {out / 'bad_images.txt'}):\n  " + "\n  ".join(bad[:20])
        + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))


def _bad_in_epoch(indices: list[int], samples, info: DistInfo) -> list[str]:
    """Paths of the samples found unreadable during the epoch, from every rank, each once."""
    found = sorted({i for part in gather_objects(sorted(set(indices)), info) for i in part})
    return [f"{samples[i][0]}: unreadable image (found while loading)" for i in found]


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
    t_start = time.perf_counter()
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
    train_samples, val_samples, train_cache, val_cache = _check_images(splits, cfg, out, say, info)
    if not val_samples:
        raise DataError("no validation images; add a validation split or pass --val-fraction")
    per_rank = -(-len(train_samples) // info.world_size)
    if per_rank < cfg.batch_size:
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the {per_rank} training images per process: "
                        "every batch would be incomplete and training drops those; lower --batch-size")
    spec = get_spec(cfg.model)
    pre = PreprocessSpec.for_size(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    aug = AugmentConfig(cfg.img_size, cfg.scale_min, hflip=cfg.hflip, vflip=cfg.vflip,
                        auto_augment=cfg.auto_augment, random_erasing=cfg.random_erasing,
                        interpolation=cfg.interpolation)
    workers = default_workers(cfg.workers)
    train_ds = ImageSamples(train_samples, transform=build_train_transform(aug), mark_bad=True, cache=train_cache,
                            blank_size=cfg.img_size)
    val_ds = ImageSamples(val_samples, eval_spec=pre, mark_bad=True, cache=val_cache)
    labels = [lbl for _, lbl in train_samples]
    sample_weights = None
    if cfg.balanced_sampler:
        cw = balanced_class_weights(labels, len(classes))
        sample_weights = cw[torch.tensor(labels)].double()
    train_sampler = SeededShuffleSampler(len(train_ds), cfg.seed, info.rank, info.world_size,
                                         weights=sample_weights)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                     persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    # The loaders draw their worker base seed from their own generator, not the global one, so the
    # loop's random draws (mixup) are the same whether or not a loader was created mid-epoch (resume).
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(mix_seed(cfg.seed, info.rank, 1)), **loader_kw)
    val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 64), drop_last=False,
                            sampler=EvalShardSampler(len(val_ds), info.rank, info.world_size),
                            generator=torch.Generator().manual_seed(mix_seed(cfg.seed, info.rank, 2)), **loader_kw)

    # ---- model
    seed_everything(cfg.seed)
    model = create_model(cfg.model, len(classes), cfg.img_size)
    if cfg.pretrained and resume_ckpt is None:
        report = load_pretrained(model, spec, cfg.pretrained)
        say(f"pretrained {cfg.pretrained}: {report}")
    if cfg.sync_bn and info.enabled:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm synchronises GPU tensors only); "
                            "drop it when training on CPUs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    amp_dtype = resolve_amp(cfg.amp, device)
    if distiller is not None:
        distiller.prepare(classes, device, cfg, amp_dtype)
    steps_per_epoch = -(-len(train_loader) // cfg.accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov,
                                amp_dtype=amp_dtype)
    schedule = LRSchedule(cfg.scheduler, cfg.lr, total_steps, int(round(cfg.warmup_epochs * steps_per_epoch)),
                          cfg.warmup_lr, cfg.min_lr, [int(m * steps_per_epoch) for m in cfg.milestones],
                          cfg.gamma)
    st = LoopState(model=model, net=model, optimizer=optimizer, schedule=schedule,
                   scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                   mixer=BatchMixer(len(classes), cfg.mixup, cfg.cutmix, cfg.mix_prob),
                   normalize=Normalize(cfg.mean, cfg.std).to(device), device=device, info=info,
                   num_classes=len(classes), epochs=cfg.epochs, ema=ModelEMA(model, cfg.ema_decay) if cfg.ema else None,
                   class_weights=balanced_class_weights(labels, len(classes)).to(device)
                   if cfg.class_weights == "auto" else None,
                   amp_dtype=amp_dtype, memory_format=memory_format, accum_steps=cfg.accum_steps,
                   clip_grad=cfg.clip_grad, label_smoothing=cfg.label_smoothing, max_steps=cfg.max_steps,
                   log_every=max(cfg.log_every, 1), distiller=distiller)

    start_epoch, best, best_epoch, best_source = 0, -1.0, -1, "model"
    resume_batch = 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        schedule.load_state_dict(resume_ckpt["schedule"])
        st.scaler.load_state_dict(resume_ckpt["scaler"])
        if st.ema is not None and resume_ckpt.get("ema"):
            st.ema.load_state_dict(resume_ckpt["ema"])
        start_epoch = resume_ckpt["epoch"]
        best, best_epoch = resume_ckpt["best_metric"], resume_ckpt["best_epoch"]
        best_source = resume_ckpt.get("best_source", "model")
        resume_batch = (resume_ckpt.get("partial") or {}).get("batch", 0)
        say(f"resumed {cfg.resume} at epoch {start_epoch + 1}, batch {resume_batch} (step {schedule.step})")

    metrics_log = MetricsLog(out, enabled=info.is_main)
    say(f"{cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}"
        f"{f' x{info.world_size}' if info.enabled else ''}, {len(classes)} classes, {len(train_samples)} train / "
        f"{len(val_samples)} val images ({splits.layout}), amp={amp_dtype}, channels_last={cfg.channels_last}, "
        f"workers={workers}")

    frozen_state = None
    t_train = time.perf_counter()
    epochs_run = 0
    stopped_early = False
    first_batch_seconds = first_step_seconds = None
    found_bad: set[str] = set()   # paths that failed to decode during the run: kept out of the final report
    for epoch in range(start_epoch, cfg.epochs):
        frozen = cfg.freeze_backbone and (cfg.unfreeze_at is None or epoch < cfg.unfreeze_at)
        if frozen != frozen_state:
            set_backbone_trainable(model, spec, not frozen)
            frozen_state = frozen
            # DDP records which parameters need gradients when it is built: rebuild on change.
            st.net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
                if info.enabled else model
            if cfg.compile:
                st.net = torch.compile(st.net)
        st.start_epoch(epoch)
        if resume_batch and epoch == start_epoch:
            # mid-epoch: the sampler skips what was trained; the RNG continues where it stopped
            part = resume_ckpt["partial"]
            st.batch, st.elapsed = resume_batch, part["elapsed"]
            st.totals = part["totals"].to(device)
            set_rng_state(resume_ckpt["rng"])
            train_sampler.set_epoch(epoch, skip=resume_batch * cfg.batch_size)
        else:
            seed_everything(mix_seed(cfg.seed, epoch, info.rank))
            train_sampler.set_epoch(epoch)
        stats = train_epoch(st, train_loader, say, quiet)
        if first_step_seconds is None and st.first_step_at is not None:
            first_batch_seconds = round(st.first_batch_at - t_start, 3)
            first_step_seconds = round(st.first_step_at - t_start, 3)
        bad = _bad_in_epoch(st.bad, train_samples, info)
        if not stats.pop("complete"):
            if info.is_main:
                ckpt = _checkpoint(cfg, st, epoch, best, best_epoch, best_source, classes, pre, None, splits.layout)
                ckpt["partial"] = {"batch": st.batch, "totals": st.totals.cpu(), "elapsed": st.elapsed}
                atomic_save(ckpt, out / "last.pt")
            say(f"stopped at step {schedule.step} (--max-steps), batch {st.batch} of epoch {epoch + 1}; "
                f"--resume {out} continues from there")
            barrier(info)
            _raise_if_bad(bad, cfg, out, say, info)
            break
        val = validate(model, val_loader, st, st.class_weights)
        bad += _bad_in_epoch(val.pop("bad"), val_samples, info)
        found_bad.update(b.split(": ", 1)[0] for b in bad)
        record = {"epoch": epoch + 1, **stats, **{f"val_{k}": v for k, v in val.items()}}
        candidates = {"model": val["top1"]}
        if st.ema is not None:
            ema_val = validate(st.ema.module, val_loader, st, st.class_weights)
            ema_val.pop("bad")
            record.update({f"ema_val_{k}": v for k, v in ema_val.items()})
            candidates["ema"] = ema_val["top1"]
        source, metric = max(candidates.items(), key=lambda kv: (kv[1], kv[0] == "model"))
        improved = metric > best
        if improved:
            best, best_epoch, best_source = metric, epoch + 1, source
        record.update(best_top1=best, best_epoch=best_epoch, time=time.time())
        metrics_log.write(record)
        epochs_run += 1
        say(EpochProgress.summary_line(record, cfg.epochs, st.ema is not None))
        if info.is_main:
            ckpt = _checkpoint(cfg, st, epoch + 1, best, best_epoch, best_source, classes, pre, record, splits.layout)
            atomic_save(ckpt, out / "last.pt")
            if improved:
                _link_or_copy(out / "last.pt", out / "best.pt")
        barrier(info)
        _raise_if_bad(bad, cfg, out, say, info)
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
               "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
               "first_batch_seconds": first_batch_seconds, "first_step_seconds": first_step_seconds}
    if info.is_main and epochs_run and (out / "best.pt").exists():
        metrics_log.finish()
        from ..evaluation import evaluate_checkpoint

        report = evaluate_checkpoint(out / "best.pt", samples=[s for s in val_samples if s[0] not in found_bad],
                                     out_dir=out / "report",
                                     device=device, batch_size=max(cfg.batch_size, 64), workers=workers)
        summary["report"] = {"top1": report["top1"], "top5": report["top5"], "macro_f1": report["macro_f1"],
                             "dir": str(out / "report")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _raise_if_bad(bad: list[str], cfg: TrainConfig, out: Path, say, info: DistInfo) -> None:
    """Images whose pixels failed to decode this epoch: listed (and, with 'error', training stops)."""
    if not bad:
        return
    if cfg.on_bad_image == "error":
        _report_bad(bad, out, lambda msg: None, info, "found")
        raise DataError(f"{len(bad)} image(s) could not be decoded during the epoch (their headers were fine); the "
                        f"epoch's checkpoint is saved:\n  " + "\n  ".join(bad) + "\nFix or delete them and continue "
                        f"with --resume {out}, or add --on-bad-image skip to leave them out.")
    _report_bad(bad, out, say, info, "left out")


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


def _checkpoint(cfg: TrainConfig, st: LoopState, epoch: int, best: float, best_epoch: int, best_source: str,
                classes: list[str], pre: PreprocessSpec, record: dict | None, layout: str) -> dict:
    """``epoch``: epochs completed (a mid-epoch stop adds ``partial`` to the result)."""
    return {
        "distill": st.distiller.describe() if st.distiller is not None else None,
        "format": CHECKPOINT_FORMAT,
        "arch": cfg.model,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": pre.to_dict(),
        "config": cfg.to_dict(),
        "model": st.model.state_dict(),
        "ema": st.ema.state_dict() if st.ema is not None else None,
        "optimizer": st.optimizer.state_dict(),
        "schedule": st.schedule.state_dict(),
        "scaler": st.scaler.state_dict(),
        "epoch": epoch,
        "step": st.schedule.step,
        "best_metric": best,
        "best_epoch": best_epoch,
        "best_source": best_source,
        "metrics": record,
        "partial": None,
        "data_layout": layout,
        "rng": rng_state(),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
