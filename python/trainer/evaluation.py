"""Evaluate a checkpoint on labelled images.

    python -m trainer evaluate --checkpoint runs/digits/best.pt --data data/digits [--json]
    python -m trainer evaluate --checkpoint runs/a/best.pt runs/b/best.pt --weights 0.6,0.4 --tta hflip --data data/digits
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .inference import model_from_checkpoint
from .data import Normalize, load_eval_samples
from .engine.evaluate import batch_logits, classification_report, eval_loader, write_report
from .engine.runtime import default_workers, resolve_amp, resolve_device
from .errors import UserError


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | None = None, samples=None,
                        out_dir: str | os.PathLike | None = None, device="cpu", batch_size: int = 64,
                        workers: int = -1, weights: str = "auto", amp: str = "none") -> dict:
    """Full report for a checkpoint; writes report.json, CSVs and the confusion PNG when out_dir is set."""
    loaded = model_from_checkpoint(checkpoint, weights)
    if samples is None:
        if data is None:
            raise UserError("give --data (a dataset root, a folder of class folders, or a list file)")
        cfg = loaded.checkpoint.get("config", {})
        samples = load_eval_samples(data, loaded.classes, cfg.get("val_fraction"), cfg.get("seed", 0))
    device = resolve_device(device) if isinstance(device, str) else device
    model = loaded.model.to(device)
    normalize = Normalize(loaded.preprocess.mean, loaded.preprocess.std).to(device)
    loader = eval_loader(samples, loaded.preprocess, batch_size, default_workers(workers))
    logits, labels = batch_logits(model, loader, device, normalize, resolve_amp(amp, device))
    probs = torch.softmax(logits, dim=1).numpy()
    report = classification_report(probs, labels.numpy(), loaded.classes)
    report.update(checkpoint=str(loaded.checkpoint["path"]), weights=loaded.weights, arch=loaded.spec.name)
    if out_dir is not None:
        report["files"] = write_report(report, Path(out_dir), loaded.classes)
    return report


def evaluate_ensemble(checkpoints: list[str], data: str | None = None, samples=None, weights: list[float] | None = None,
                      fusion: str | None = None, tta: str = "none", tta_merge: str = "mean",
                      out_dir: str | os.PathLike | None = None, device="auto", batch_size: int = 64,
                      workers: int = -1, weights_from: str = "auto", amp: str = "none") -> dict:
    """Evaluate each checkpoint (with TTA) and their fusion on the same labelled images.

    Returns the ensemble's full report plus ``members`` (each member's top-1/top-5/loss/macro-F1),
    ``best_member`` and ``gain_over_best_member`` (ensemble top-1 minus the best member's). Each member
    uses its own preprocessing (input size, mean/std) and the same TTA policy.
    """
    from .ensemble import fuse_probs, normalise_weights
    from .predict import predict_paths
    from .tta import parse_policy

    if not checkpoints:
        raise UserError("give at least one --checkpoint")
    if weights is not None:
        normalise_weights(weights, len(checkpoints))  # refuses a wrong count before any work
    views = parse_policy(tta)
    fusion = fusion or ("weighted" if weights is not None else "mean")
    dev = resolve_device(device) if isinstance(device, str) else device
    members, probs_list = [], []
    labels = classes = None
    for path in checkpoints:
        loaded = model_from_checkpoint(path, weights_from)
        if classes is None:
            classes = loaded.classes
            if samples is None:
                if data is None:
                    raise UserError("give --data (a dataset root, a folder of class folders, or a list file)")
                cfg = loaded.checkpoint.get("config", {})
                samples = load_eval_samples(data, classes, cfg.get("val_fraction"), cfg.get("seed", 0))
            labels = np.asarray([lbl for _, lbl in samples])
        elif loaded.classes != classes:
            raise UserError(f"{path} predicts classes {loaded.classes}, but {checkpoints[0]} predicts {classes}; "
                             "an ensemble needs models trained on the same classes")
        probs, _ = predict_paths(loaded.model, loaded.preprocess, [p for p, _ in samples], views, tta_merge, dev,
                                 batch_size, default_workers(workers), strict=True,
                                 amp_dtype=resolve_amp(amp, dev))
        rep = classification_report(probs, labels, classes)
        if tta_merge == "vote":
            rep["loss"] = float("nan")  # vote fractions are not probabilities: no log-loss
        members.append({"checkpoint": str(loaded.checkpoint["path"]), "arch": loaded.spec.name,
                        "weights": loaded.weights, "top1": rep["top1"], "top5": rep["top5"], "loss": rep["loss"],
                        "macro_f1": rep["macro_f1"]})
        probs_list.append(probs)
    fused = probs_list[0] if len(probs_list) == 1 else fuse_probs(probs_list, fusion, weights)
    report = classification_report(fused, labels, classes)
    if (fusion == "vote" and len(probs_list) > 1) or tta_merge == "vote":
        report["loss"] = float("nan")  # vote fractions are not probabilities: no log-loss
    best = max(members, key=lambda m: m["top1"])
    report.update(checkpoints=[m["checkpoint"] for m in members], members=members, tta=tta, tta_merge=tta_merge,
                  fusion=fusion if len(members) > 1 else None,
                  ensemble_weights=normalise_weights(weights, len(members)).round(6).tolist(),
                  best_member=best["checkpoint"], gain_over_best_member=report["top1"] - best["top1"])
    if len(members) == 1:
        report.update(checkpoint=members[0]["checkpoint"], arch=members[0]["arch"], weights=members[0]["weights"])
    if out_dir is not None:
        report["files"] = write_report(report, Path(out_dir), classes)
    return report


def format_members(report: dict) -> str:
    lines = [f"{'member':<40} {'arch':<20} {'top-1':>7}"]
    for m in report["members"]:
        lines.append(f"{m['checkpoint'][-40:]:<40} {m['arch']:<20} {m['top1']:7.4f}")
    if len(report["members"]) > 1:
        lines.append(f"{'ensemble (' + str(report['fusion']) + ')':<40} {'':<20} {report['top1']:7.4f}")
        lines.append(f"ensemble gain over the best member: {report['gain_over_best_member'] * 100:+.2f} points top-1")
    return "\n".join(lines)
