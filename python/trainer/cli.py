"""Command line: ``python -m trainer <command> --help``.

    python -m trainer demo-data --out data/digits
    python -m trainer train --config configs/digits.yaml --out runs/digits
    python -m trainer evaluate --checkpoint runs/digits/best.pt --data data/digits
    python -m trainer prepare data/raw --out data/lists
    python -m trainer check-data --data data/digits
    python -m trainer models
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import TrainConfig, add_config_arguments, resolve_config
from .errors import UserError


def _cmd_train(args) -> int:
    from .engine.checkpoint import load_checkpoint
    from .engine.train import train

    base = None
    if args.resume:
        base = load_checkpoint(f"{args.resume}/last.pt")["config"]
        base["resume"] = args.resume
    cfg = resolve_config(args, base)
    summary = train(cfg)
    if summary.get("report") and not cfg.quiet:
        r = summary["report"]
        print(f"best validation top-1 {summary['best_top1']:.4f} (epoch {summary['best_epoch']}, "
              f"{summary['best_source']} weights) after {summary['train_seconds']:.1f}s of training")
        print(f"checkpoint: {summary['best_checkpoint']}")
        print(f"report:     {r['dir']}/report.json (confusion matrix: {r['dir']}/confusion_matrix.png)")
        print(f"curves:     {summary['run_dir']}/curves.png   metrics: {summary['run_dir']}/metrics.jsonl")
    return 0


def _cmd_evaluate(args) -> int:
    from .engine.evaluate import format_report
    from .ensemble import parse_weights
    from .evaluation import evaluate_ensemble, format_members

    out_dir = args.out
    weights_from, weights = args.weights_from, None
    if args.weights in ("auto", "model", "ema"):  # the flag's former meaning, kept working
        weights_from = args.weights
    elif args.weights is not None:
        weights = parse_weights(args.weights)
    report = evaluate_ensemble(args.checkpoint, data=args.data, weights=weights, fusion=args.fusion, tta=args.tta,
                               tta_merge=args.tta_merge, out_dir=out_dir, device=args.device,
                               batch_size=args.batch_size, workers=args.workers, weights_from=weights_from)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        if len(args.checkpoint) > 1 or args.tta != "none":
            print(format_members(report))
        if out_dir:
            print(f"report written to {out_dir}")
    return 0


def _cmd_demo_data(args) -> int:
    from .data.demo import write_digits_dataset

    info = write_digits_dataset(args.out, args.val_fraction, args.seed, args.force)
    print(f"digits demo: {info['train']} train / {info['val']} val images in {args.out}")
    return 0


def _cmd_prepare(args) -> int:
    from .data.prepare import prepare_lists

    info = prepare_lists(args.src, args.out, args.val_fraction, args.seed)
    print(f"wrote {info['out']}/train.txt ({info['train']}), val.txt ({info['val']}), classes.json "
          f"({len(info['classes'])} classes)")
    return 0


def _cmd_check_data(args) -> int:
    from .data import discover_dataset
    from .data.index import check_decode

    splits = discover_dataset(args.data, args.val_fraction, 0)
    paths = [p for p, _ in splits.train + splits.val]
    bad = check_decode(paths, args.workers or None, progress=not args.quiet)
    for line in bad:
        print(line)
    print(f"{len(paths) - len(bad)} of {len(paths)} images decode ({splits.layout}, {len(splits.classes)} classes)"
          + (f"; {len(bad)} unreadable: fix or delete them, or train with --on-bad-image skip" if bad else ""))
    return 1 if bad else 0


def _cmd_models(args) -> int:
    from .models import list_models

    specs = list_models()
    if args.json:
        print(json.dumps([{"name": s.name, "family": s.family, "source": s.source, "head": s.head,
                           "default_img_size": s.default_img_size} for s in specs]))
        return 0
    print(f"{'name':<22} {'family':<22} {'source':<22} {'head':<15} default size")
    for s in specs:
        print(f"{s.name:<22} {s.family:<22} {s.source:<22} {s.head:<15} {s.default_img_size}")
    import importlib.util

    timm = "installed" if importlib.util.find_spec("timm") else "pip install 'shipclassifier[timm]'"
    print(f"plus any timm model as timm/<name> or timm/<name>.<weights tag> ({timm}); "
          "--pretrained imagenet fine-tunes from each library's default ImageNet weights")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train and evaluate image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier", description="Train a classifier. Settings come from "
                       "defaults < --config YAML < the resumed run < flags.")
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (or an ensemble of them, with TTA): top-1/top-5, "
                       "per-class metrics, confusion matrix")
    p.add_argument("--checkpoint", required=True, nargs="+", help="RUN_DIR/best.pt (or a run directory); several "
                   "are evaluated as an ensemble")
    p.add_argument("--data", required=True, help="dataset root (its validation split), folder of class folders, "
                   "or a list file")
    p.add_argument("--out", help="write report.json, per_class.csv, confusion_matrix.csv/png here")
    p.add_argument("--weights", help="ensemble weights, one per checkpoint, e.g. 0.6,0.4 (default: equal)")
    p.add_argument("--fusion", default=None, choices=["mean", "weighted", "vote"],
                   help="ensemble fusion (default: weighted when --weights are given, else mean)")
    p.add_argument("--tta", default="none", help="TTA policy for every member (none, hflip, vflip, hvflip, "
                   "five-crop, ten-crop, multiscale:S1,S2,...)")
    p.add_argument("--tta-merge", default="mean", choices=["mean", "max", "vote"])
    p.add_argument("--weights-from", default="auto", choices=["auto", "model", "ema"],
                   help="which weights of each checkpoint: auto = whichever scored best during training")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo-data", help="write scikit-learn's digits as an image-folder dataset")
    p.add_argument("--out", default="data/digits")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rewrite even if the dataset exists")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("prepare", help="convert a class-folder tree into train.txt/val.txt + classes.json")
    p.add_argument("src", help="folder of class folders (or a root with train/ and val/)")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("check-data", help="decode every image of a dataset (in parallel) and list unreadable ones; "
                       "exit code 1 when there are any")
    p.add_argument("--data", required=True, help="dataset root, folder of class folders, or list files' folder")
    p.add_argument("--val-fraction", type=float, default=None, help="as for train (layouts without a val split)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (0: two per core, at most 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)

    from .cli_extras import add_commands

    add_commands(sub)  # predict, ensemble, distill, features, visualize
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:   # only the project's own: a real bug keeps its traceback
        if os.environ.get("TRAINER_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
