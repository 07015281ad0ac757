"""Command line: ``python -m batch --help``.

    python -m batch --bundle bundles/digits --images data/photos --out preds/          # a folder tree
    python -m batch --bundle bundles/digits --images photos.txt --out preds/ --topk 3 --save-probs
    python -m batch --bundle bundles/digits --images index.parquet --column file --out preds/
    python -m batch --bundle bundles/digits --images index.csv --out preds/ --ray-address auto   # a Ray cluster

Run the same command again to resume: parts already written are kept and their images skipped.
Exit codes: 0 done (error rows for unreadable images included), 2 a user error (no such bundle or
input, an output folder of another job, ...), printed without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from .job import BatchOptions, run_batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m batch", description="Classify a folder, list file or table of "
                                "images with a bundle into Parquet parts; a rerun with the same --out resumes.")
    p.add_argument("--bundle", required=True, help="bundle folder (model or ensemble) from python -m export")
    p.add_argument("--images", required=True, help="a folder (searched recursively), a list file (one path per "
                   "line), a single image, or a .parquet/.csv table with a column of paths")
    p.add_argument("--out", required=True, help="output folder of Parquet parts (created; the same folder resumes)")
    p.add_argument("--column", default="path", help="the column of paths in a .parquet/.csv --images (default: path)")
    p.add_argument("--backend", default="auto", help="export.load_bundle backend: auto, onnxruntime, pt2, "
                   "torchscript, native, ... (default: auto, the fastest the bundle has)")
    p.add_argument("--tta", default=None, help="TTA policy instead of the bundle's (none, hflip, five-crop, "
                   "multiscale:S1,S2, ...); ensembles apply it to every member")
    p.add_argument("--topk", type=int, default=5, help="labels and probabilities kept per image (default: 5)")
    p.add_argument("--save-probs", action="store_true", help="also keep every class's probability (column probs)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--workers", type=int, default=-1, help="decode processes (default: -1, one per CPU core)")
    p.add_argument("--threads", type=int, default=None, help="model threads (default: the backend's; 1 per Ray actor)")
    p.add_argument("--part-size", type=int, default=10_000, help="rows per Parquet part, the unit of resume "
                   "(default: 10000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (on Ray: one GPU per actor)")
    p.add_argument("--ray-address", default=None, help="run on Ray Data: auto (the cluster 'ray start' made), "
                   "ray://HOST:10001, or local (a Ray instance on this machine)")
    p.add_argument("--ray-workers", type=int, default=0, help="Ray actors (default: one per CPU, or GPU with "
                   "--device cuda, of the cluster)")
    p.add_argument("--trusted-key", action="append", default=[], dest="trusted_keys",
                   help="Ed25519 public key a bundle signature must match (repeatable)")
    p.add_argument("--require-signature", action="store_true", help="refuse unsigned bundles")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    return p


def main(argv=None) -> int:
    from export.manifest import BundleError
    from trainer.errors import UserError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = BatchOptions(**{k: v for k, v in vars(args).items() if k not in ("quiet", "json")},
                        progress=not args.quiet)
    try:
        summary = run_batch(opts)
    except (UserError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(summary), "images_per_s": round(summary.images_per_s, 2)}))
    else:
        print(f"{summary.out}: {summary.written} rows written in {summary.parts} part(s) ({summary.errors} error "
              f"rows), {summary.skipped} already done, {summary.total} inputs")
    return 0
