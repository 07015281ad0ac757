"""Evaluation: batched inference over labelled samples and a full classification report.

    python -m trainer evaluate --checkpoint runs/digits/best.pt --data data/digits
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import ImageSamples, Normalize, PreprocessSpec
from .runtime import autocast


@torch.no_grad()
def batch_logits(model: torch.nn.Module, loader, device: torch.device, normalize: Normalize,
                 amp_dtype=None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over a loader of (uint8 images, labels) -> (logits float32 (N, K), labels (N,))."""
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        x = normalize(x.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            out = model(x)
        outs.append(out.float().cpu())
        labels.append(torch.as_tensor(y))
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


def eval_loader(samples, spec: PreprocessSpec, batch_size: int, workers: int, sampler=None) -> DataLoader:
    ds = ImageSamples(samples, eval_spec=spec)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                      persistent_workers=False, pin_memory=False)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their label among the top k, as a 0-d tensor on the logits' device (no sync)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels.view(-1, 1)).any(dim=1).sum()


def classification_report(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1/top-5 (top-5 only with more than 5 classes), per-class precision/recall/F1, confusion."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = len(classes)
    preds = probs.argmax(axis=1)
    n = len(labels)
    report = {"num_samples": int(n), "num_classes": k,
              "top1": float((preds == labels).mean()) if n else float("nan")}
    if k > 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        report["top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    else:
        report["top5"] = None  # undefined with 5 classes or fewer: every prediction would count
    nll = -np.log(np.clip(probs[np.arange(n), labels], 1e-12, None))
    report["loss"] = float(nll.mean()) if n else float("nan")
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=list(range(k)), zero_division=0)
    report["per_class"] = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(s[i])} for i, c in enumerate(classes)]
    report["macro_f1"] = float(f[s > 0].mean()) if (s > 0).any() else 0.0
    report["confusion_matrix"] = confusion_matrix(labels, preds, labels=list(range(k))).tolist()
    return report


def write_report(report: dict, out_dir: Path, classes: list[str]) -> dict[str, str]:
    """report.json, per_class.csv, confusion_matrix.csv and confusion_matrix.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "per_class": out_dir / "per_class.csv",
             "confusion_csv": out_dir / "confusion_matrix.csv", "confusion_png": out_dir / "confusion_matrix.png"}
    paths["json"].write_text(json.dumps(report, indent=2), encoding="utf-8")
    with open(paths["per_class"], "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        w.writerows(report["per_class"])
    cm = np.asarray(report["confusion_matrix"])
    with open(paths["confusion_csv"], "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["true\\pred"] + classes)
        for c, row in zip(classes, cm):
            w.writerow([c] + row.tolist())
    plot_confusion(cm, classes, paths["confusion_png"])
    return {k: str(v) for k, v in paths.items()}


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(4 + 0.45 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (top-1 {np.trace(cm) / max(cm.sum(), 1):.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_report(report: dict) -> str:
    lines = [f"samples {report['num_samples']}  top-1 {report['top1']:.4f}"
             + (f"  top-5 {report['top5']:.4f}" if report.get("top5") is not None else "")
             + f"  loss {report['loss']:.4f}  macro-F1 {report['macro_f1']:.4f}"]
    lines.append(f"{'class':>16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7}")
    for row in report["per_class"]:
        lines.append(f"{row['class'][:16]:>16} {row['precision']:9.4f} {row['recall']:7.4f} {row['f1']:7.4f} "
                     f"{row['support']:7d}")
    return "\n".join(lines)
