"""What a run shows and leaves behind: progress bars, metrics.jsonl, TensorBoard events, plots."""
from __future__ import annotations

import json
import sys
from pathlib import Path


class EpochProgress:
    """A tqdm bar on a terminal (its text refreshed at log time); nothing per batch otherwise: the loop
    prints a line every --log-every batches and the epoch summary line."""

    def __init__(self, total_batches: int, epoch: int, epochs: int, enabled: bool = True, done: int = 0):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_batches, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, batches: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(batches)

    def describe(self, line: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("  ", 1)[-1], refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @staticmethod
    def summary_line(r: dict, epochs: int, with_ema: bool) -> str:
        line = (f"epoch {r['epoch']:>3}/{epochs}  loss {r['train_loss']:.4f}  train {r['train_top1']:.4f}  "
                f"val {r['val_top1']:.4f}")
        if r.get("val_top5") is not None:
            line += f" (top-5 {r['val_top5']:.4f})"
        if with_ema:
            line += f"  ema {r['ema_val_top1']:.4f}"
        return line + f"  lr {r['lr']:.2e}  {r['images_per_sec']:.0f} img/s  {r['epoch_seconds']:.1f}s"


class MetricsLog:
    """metrics.jsonl (one line per epoch), TensorBoard events when installed, PNG curves at the end."""

    def __init__(self, out: Path, enabled: bool = True):
        self.out, self.enabled = out, enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "time"):
                    self.writer.add_scalar(k, v, record["epoch"])
            self.writer.flush()

    def finish(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        plot_curves(read_metrics(self.path), self.out / "curves.png")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    # a resumed run appends: keep the latest record of each epoch
    latest = {r["epoch"]: r for r in rows}
    return [latest[e] for e in sorted(latest)]


def plot_curves(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ep, [r["train_loss"] for r in rows], label="train")
    axes[0].plot(ep, [r["val_loss"] for r in rows], label="val")
    axes[0].set_title("loss")
    axes[1].plot(ep, [r["train_top1"] for r in rows], label="train")
    axes[1].plot(ep, [r["val_top1"] for r in rows], label="val")
    if "ema_val_top1" in rows[0]:
        axes[1].plot(ep, [r["ema_val_top1"] for r in rows], label="val (EMA)")
    axes[1].set_title("top-1 accuracy")
    axes[2].plot(ep, [r["lr"] for r in rows])
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
