"""Training throughput: our trainer vs a plain loop written the way the seed project trained.

    python benchmarks/train_throughput.py                     # digits demo, resnet18 at 32 px
    python benchmarks/train_throughput.py --model resnet50 --img-size 64 --epochs 3 --repeats 3
    python benchmarks/train_throughput.py --families         # the model families' images/s, ratio to resnet18
    python benchmarks/train_throughput.py --first-step       # time to the first step, 1x and 10x the images

Both sides use the same data, model, batch size, image size, thread count and worker count, and
run in separate fresh processes (alternating, ``--repeats`` times), so peak memory (max RSS) is
measured per side. Ours is the real ``trainer.engine.train.train`` (bf16 autocast, channels-last,
fused SGD, uint8 loading with batch normalisation); its images/s is the median over the epochs
after the first. The baseline is fp32, NCHW, plain SGD, PIL transforms + ToTensor + Normalize in
the loader. The last line of output is the JSON result.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_ours(args) -> dict:
    from trainer.config import TrainConfig
    from trainer.engine.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=args.data, model=args.model, img_size=args.img_size, crop_pct=1.0, hflip=0.0,
                          scale_min=0.85, epochs=args.epochs, batch_size=args.batch_size, lr=0.05,
                          workers=args.workers, threads=args.threads, out=out, quiet=True)
        train(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    ips = [r["images_per_sec"] for r in rows[1:]] or [rows[0]["images_per_sec"]]
    return {"images_per_sec": statistics.median(ips), "epochs": len(rows)}


def run_baseline(args) -> dict:
    import torch
    import torchvision
    from torchvision import transforms

    from trainer.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.img_size, scale=(0.85, 1.0)),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    ds = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
    model = create_model(args.model, len(ds.classes), args.img_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    crit = torch.nn.CrossEntropyLoss()
    ips = []
    for _ in range(args.epochs):
        model.train()
        t0, n = time.perf_counter(), 0
        for x, y in loader:
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            n += y.shape[0]
        ips.append(n / (time.perf_counter() - t0))
    return {"images_per_sec": statistics.median(ips[1:] or ips), "epochs": args.epochs}


def child(args) -> None:
    res = run_ours(args) if args.child == "ours" else run_baseline(args)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


FAMILIES = ["resnet18", "regnet_y_400mf", "efficientnet_v2_s", "convnext_tiny", "swin_t", "vit_b_16",
            "timm/convnext_nano", "timm/vit_tiny_patch16_224"]


def run_families(args) -> dict:
    """Our trainer on each family in turn (one fresh process each); resnet18 is the baseline of the ratios."""
    import importlib.util

    names = args.families.split(",") if args.families != "default" else FAMILIES
    if importlib.util.find_spec("timm") is None:
        names = [n for n in names if not n.startswith("timm/")]  # the timm extra is optional
    rows = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", "ours", "--model", name, "--data", args.data, "--img-size",
               str(args.img_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--threads", str(args.threads), "--workers", str(args.workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(line[0][7:])
        print(f"{name:<28} {rows[name]['images_per_sec']:8.1f} img/s  peak RSS {rows[name]['peak_rss_mb']:.0f} MB",
              flush=True)
    base = rows[names[0]]["images_per_sec"]
    for r in rows.values():
        r["ratio_to_" + names[0]] = r["images_per_sec"] / base
    return {"img_size": args.img_size, "batch_size": args.batch_size, "threads": args.threads,
            "epochs": args.epochs, "baseline": names[0], "families": rows}


def first_step(args) -> dict:
    """Seconds from train() to the first batch and to the first optimizer step with 1x and 10x the training images (copies of
    the digits), each with a cold image index (first run on the data) and a warm one (every later run
    or resume), --cache-images off. Start-up reads file headers only, so it must not grow 10x."""
    import shutil

    from trainer.config import TrainConfig
    from trainer.engine.train import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SHIPCLASSIFIER_CACHE"] = str(Path(tmp) / "cache")
        for factor in (1, 10):
            data = Path(tmp) / f"x{factor}"
            for split in ("train", "val"):
                for cls in sorted(Path(args.data, split).iterdir()):
                    dst = data / split / cls.name
                    dst.mkdir(parents=True)
                    for f in sorted(cls.iterdir()):
                        for k in range(factor if split == "train" else 1):
                            shutil.copyfile(f, dst / f"{k}_{f.name}")
            n = sum(1 for _ in (data / "train").rglob("*.png"))
            for index in ("cold", "warm"):
                cfg = TrainConfig(data=str(data), model=args.model, img_size=args.img_size, crop_pct=1.0, epochs=1,
                                  batch_size=args.batch_size, workers=args.workers, threads=args.threads,
                                  cache_images="off", max_steps=1, out=str(Path(tmp) / f"run{factor}{index}"),
                                  quiet=True)
                s = train(cfg)
                rows.append({"train_images": n, "index": index, "first_batch_seconds": s["first_batch_seconds"],
                             "first_step_seconds": s["first_step_seconds"]})
                print(f"{n:>7} train images, {index} index: first batch after {s['first_batch_seconds']:.2f} s, "
                      f"first step after {s['first_step_seconds']:.2f} s", flush=True)
    return {"first_step": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / "data" / "digits"))
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="per run; the first epoch is warm-up")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    ap.add_argument("--families", nargs="?", const="default", help="measure our trainer on each model family "
                    "(comma-separated names; default: one per family, timm's when installed) instead of the "
                    "baseline comparison")
    ap.add_argument("--first-step", action="store_true", help="measure time-to-first-step at 1x and 10x the images")
    ap.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not Path(args.data, "train").is_dir():
        from trainer.data.demo import write_digits_dataset

        write_digits_dataset(args.data)
    if args.first_step:
        print(json.dumps(first_step(args)))
        return
    if args.families:
        summary = run_families(args)
        out = Path(args.out).with_name("family_throughput.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        print(f"\n| model | images/s | ratio to {summary['baseline']} | peak RSS MB |\n|---|---|---|---|")
        for name, r in summary["families"].items():
            print(f"| {name} | {r['images_per_sec']:.1f} | {r['ratio_to_' + summary['baseline']]:.2f} | "
                  f"{r['peak_rss_mb']:.0f} |")
        print(json.dumps(summary))
        return
    results: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for rep in range(args.repeats):
        for side in ("baseline", "ours"):
            cmd = [sys.executable, __file__, "--child", side] + [
                a for k, v in vars(args).items() if k not in ("child", "repeats", "out")
                for a in (f"--{k.replace('_', '-')}", str(v))]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            results[side].append(r)
            print(f"repeat {rep + 1}: {side:<8} {r['images_per_sec']:8.1f} img/s  peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    summary = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
               "threads": args.threads, "workers": args.workers, "epochs": args.epochs, "repeats": args.repeats}
    for side in ("baseline", "ours"):
        summary[side] = {"images_per_sec": statistics.median(r["images_per_sec"] for r in results[side]),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in results[side])}
    summary["speedup"] = summary["ours"]["images_per_sec"] / summary["baseline"]["images_per_sec"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"\n| side | images/s | peak RSS MB |\n|---|---|---|")
    for side in ("baseline", "ours"):
        print(f"| {side} | {summary[side]['images_per_sec']:.1f} | {summary[side]['peak_rss_mb']:.0f} |")
    print(f"speedup: {summary['speedup']:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
