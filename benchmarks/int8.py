"""int8 against fp32 on a trained model: top-1 per calibration method, what stays in float, size and speed.

    python benchmarks/int8.py --checkpoint runs/digits/best.pt --data data/digits \
        --calibration data/digits/train --threads 2 --out benchmarks/results/int8-digits

The checkpoint is exported once to a verified fp32 ONNX bundle with ``python -m export``'s library;
then for every calibration method (minmax, entropy, percentile) and every choice of what stays in
float (``none``: onnxruntime's default op list, the Softmax quantized too, as before; ``softmax``;
``softmax+head``, the export's default: the classifier layer feeding the Softmax in float too) the
fp32 ONNX is quantized with ``export.quantize.quantize_int8`` on the same calibration images and
scored with ``export.quantize.int8_accuracy`` on the labelled validation split. Per row: top-1
fp32 / int8 and the points lost, top-1 agreement with fp32, images whose two best probabilities tie
exactly, how many distinct probability values it returns, the largest probability difference to fp32,
the size of the model file and the median ONNX Runtime latency (``--threads``) at batch 1 and
``--batch``, as ratios to fp32. Writes int8.json and int8.md under --out; the last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from backends import time_call  # noqa: E402

from export.build import ExportOptions, build_bundle  # noqa: E402
from export.formats import open_runtime  # noqa: E402
from export.manifest import preprocess_spec  # noqa: E402
from export.quantize import CALIBRATION_METHODS, KEEP_FLOAT, int8_accuracy, quantize_int8  # noqa: E402
from export.samples import calibration_images, validation_images  # noqa: E402
from export.verify import run_chunked  # noqa: E402


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))  # model.onnx + model.onnx.data


def ties(probs: torch.Tensor) -> int:
    top2 = probs.topk(2, dim=-1).values
    return int((top2[:, 0] == top2[:, 1]).sum())


def distinct(probs: torch.Tensor) -> int:
    """How many different probability values: at most 256 when the Softmax output is uint8."""
    return int(probs.unique().numel())


def probability_figures(fp32_probs: torch.Tensor, probs: torch.Tensor) -> dict:
    return {"ties": ties(probs), "distinct_probs": distinct(probs),
            "max_abs_diff": float((probs - fp32_probs).abs().max())}


def measure(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="int8-bench-"))
    bundle, m = build_bundle(ExportOptions(args.checkpoint, str(work / "fp32"), ["onnx"], data=args.data,
                                           max_batch=max(args.batch, 2), force=True), say=print)
    spec, fp32_path = preprocess_spec(m), bundle / m["artifacts"]["onnx"]["file"]
    val = validation_images(spec, m["classes"], args.data, limit=args.validation_limit)
    cal = calibration_images(spec, args.calibration, args.calibration_count)
    fp32 = open_runtime(fp32_path, "onnx", threads=args.threads)
    x1, xb = val.images[:1], val.images[:args.batch]
    base = {"bytes": model_bytes(fp32_path), "ms_batch1": 1e3 * time_call(fp32, x1, 3, args.repeats, 1.0),
            f"ms_batch{args.batch}": 1e3 * time_call(fp32, xb, 2, args.repeats, 1.0),
            "ties": ties(fp32_probs := run_chunked(fp32, val.images, 64)), "distinct_probs": distinct(fp32_probs)}
    rows = []
    for method in args.methods:
        for keep in args.keep_float:
            out = work / f"{method}-{keep}.int8.onnx"
            q = quantize_int8(fp32_path, out, cal.images, method, keep_float=keep)
            run = open_runtime(out, "onnx", threads=args.threads)
            acc = int8_accuracy(fp32, run, val, 64, float("inf"))
            row = {"method": method, "float": keep, "float_nodes": q["float_nodes"], **acc,
                   **probability_figures(fp32_probs, run_chunked(run, val.images, 64)), "bytes": model_bytes(out),
                   "ms_batch1": 1e3 * time_call(run, x1, 3, args.repeats, 1.0),
                   f"ms_batch{args.batch}": 1e3 * time_call(run, xb, 2, args.repeats, 1.0)}
            for k in ("bytes", "ms_batch1", f"ms_batch{args.batch}"):
                row[f"{k}_ratio"] = row[k] / base[k]
            rows.append(row)
            print(f"  {method:10s} {keep:13s} top-1 {acc['top1_int8']:.4f} (fp32 {acc['top1_fp32']:.4f}, "
                  f"{acc['top1_drop']:+.2f} points) ties {row['ties']} speed x{1 / row['ms_batch1_ratio']:.2f}",
                  flush=True)
    return {"checkpoint": str(args.checkpoint), "architecture": m["architecture"], "data": str(args.data),
            "validation_images": len(val), "calibration_images": len(cal), "threads": args.threads,
            "batch": args.batch, "fp32": base, "rows": rows}


def markdown(r: dict) -> str:
    b = r["batch"]
    lines = [f"{r['architecture']} on {r['data']}: {r['validation_images']} validation images, "
             f"{r['calibration_images']} calibration images, {r['threads']} threads; fp32 {r['fp32']['bytes'] / 1e6:.1f} MB, "
             f"{r['fp32']['ms_batch1']:.2f} ms at batch 1, {r['fp32'][f'ms_batch{b}']:.2f} ms at batch {b}, "
             f"{r['fp32']['ties']} top-2 ties, {r['fp32'].get('distinct_probs')} distinct probabilities", "",
             f"| calibration | in float | top-1 fp32 | top-1 int8 | points lost | agreement | top-2 ties | "
             f"distinct probabilities | max abs prob diff | size | speed-up batch 1 | speed-up batch {b} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['method']} | {row['float']} | {row['top1_fp32']:.4f} | {row['top1_int8']:.4f} | "
                     f"{row['top1_drop']:+.2f} | {row['top1_agreement']:.4f} | {row['ties']} | {row['distinct_probs']} | "
                     f"{row['max_abs_diff']:.3f} | "
                     f"{row['bytes_ratio']:.2f}x | {1 / row['ms_batch1_ratio']:.2f}x | "
                     f"{1 / row[f'ms_batch{b}_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a trained checkpoint (RUN/best.pt)")
    p.add_argument("--data", required=True, help="its dataset: the labelled val split scores int8")
    p.add_argument("--calibration", required=True, help="folder of calibration images (e.g. DATA/train)")
    p.add_argument("--calibration-count", type=int, default=256)
    p.add_argument("--validation-limit", type=int, default=2000)
    p.add_argument("--methods", nargs="+", default=list(CALIBRATION_METHODS), choices=list(CALIBRATION_METHODS))
    p.add_argument("--keep-float", nargs="+", default=list(KEEP_FLOAT), choices=KEEP_FLOAT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="the second batch size timed (besides 1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--work", help="keep the models here (default: a temporary folder)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = measure(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8.json").write_text(json.dumps(result, indent=2))
    (out / "int8.md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps({"architecture": result["architecture"], "data": result["data"],
                      "rows": [{k: row[k] for k in ("method", "float", "top1_fp32", "top1_int8", "top1_drop",
                                                      "ms_batch1_ratio", "bytes_ratio")} for row in result["rows"]]}))


if __name__ == "__main__":
    main()
