"""Side-by-side CPU inference speed of every backend a bundle offers.

    python benchmarks/backends.py --calibration data/digits/train --threads 2 \
        --accuracy-checkpoint runs/digits/best.pt --accuracy-data data/digits --out benchmarks/results
    python benchmarks/backends.py --quick ...          # fewer repeats, for a busy machine
    python benchmarks/backends.py --calibration data/digits/train --models resnet50 mobilenet_v3_large \
        --batches 1 8 --backends onnxruntime onnxruntime_int8 openvino_f32 openvino_bf16 openvino_int8 --quick
    python benchmarks/backends.py --device cuda --models resnet50 mobilenet_v3_large --batches 1 8 32 64 \
        --threads 16 --calibration data/digits/train --quick   # GPU columns next to the CPU ones

Per model (resnet50, mobilenet_v3_large, efficientnet_b0 at 224 px, untrained weights: speed does
not depend on them) and batch size (1, 8, 32): median latency and images/s of eager PyTorch,
eager channels-last, TorchScript, ONNX Runtime fp32, ONNX Runtime int8, AOTInductor .pt2 and
OpenVINO f32, bf16 (only where the CPU has native bf16) and int8 (the same QDQ model.int8.onnx as
ONNX Runtime int8), all with the same thread count; ratios are to eager. ``--backends`` picks columns
(eager is always measured: the ratios' base); formats no column needs are not exported. Each model is exported once with
``python -m export``'s library (verified), so export time per format is reported too. int8
accuracy is measured separately on a trained model (--accuracy-checkpoint) and its validation set.
Writes backends.json, backends.md and backends.png under --out; the last stdout line is JSON.

``--device cuda[:N]`` adds GPU columns to the same table: eager fp32 and fp16 on the GPU, the CUDA
TorchScript and .pt2 artifacts (fp32 and each of ``--precisions``) and ONNX Runtime on the CUDA
execution provider. Inputs start on the CPU and probabilities come back to it, as in serving. With
random weights nearly every class ties, so parity checks would flag TF32/fp16 rounding as top-1 flips:
GPU runs export with verification off (scripts/gpu_check.sh verifies on a trained model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

import export  # noqa: E402
from export.build import ExportOptions, build_bundle  # noqa: E402
from export.graph import example_batch, probability_model  # noqa: E402
from export.formats import open_runtime  # noqa: E402
from export.manifest import preprocess_spec  # noqa: E402
from export.quantize import quantize_int8  # noqa: E402
from export.samples import calibration_images  # noqa: E402

MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0"]
BATCHES = [1, 8, 32]
BACKENDS = ["eager", "eager_channels_last", "torchscript", "onnxruntime", "onnxruntime_int8", "pt2", "openvino_f32",
            "openvino_bf16", "openvino_int8"]


def cuda_backends(precisions: list[str]) -> list[str]:
    half = [p for p in precisions if p != "fp32"]
    return ["cuda_eager", *[f"cuda_eager_{p}" for p in half], "cuda_torchscript", "cuda_pt2",
            *[f"cuda_pt2_{p}" for p in half], "cuda_onnxruntime"]


def untrained_checkpoint(path: Path, arch: str, img_size: int, num_classes: int) -> Path:
    """A checkpoint in the trainer's format with random weights (timing does not depend on them)."""
    from trainer.data import PreprocessSpec
    from trainer.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from trainer.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes, img_size).eval()
    atomic_save({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes,
                 "classes": [f"c{i}" for i in range(num_classes)],
                 "preprocess": PreprocessSpec.for_size(img_size).to_dict(), "config": {"data": "benchmark"},
                 "model": model.state_dict(), "ema": None, "best_source": "model"}, path)
    return path


def time_call(fn, x, warmup: int, repeats: int, min_seconds: float) -> float:
    for _ in range(warmup):
        fn(x)
    times: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def cuda_runners(bundle_dir: Path, device: str, precisions: list[str]) -> dict:
    from export.cuda_export import DTYPES
    from trainer.inference import model_from_checkpoint

    manifest = export.read_manifest(bundle_dir)
    out = {}
    for prec in ["fp32", *[p for p in precisions if p != "fp32"]]:
        model = model_from_checkpoint(manifest["provenance"]["checkpoint"]).model
        net = probability_model(model, preprocess_spec(manifest), DTYPES[prec]).to(device)

        def eager(x, net=net):
            with torch.inference_mode():
                return net(x.to(device)).cpu()

        out["cuda_eager" if prec == "fp32" else f"cuda_eager_{prec}"] = eager
        if prec != "fp32":
            out[f"cuda_pt2_{prec}"] = export.load_bundle(bundle_dir, f"pt2-{prec}", device=device).predict_tensor
    for name in ("torchscript", "pt2", "onnxruntime"):
        out[f"cuda_{name}"] = export.load_bundle(bundle_dir, backend=name, device=device).predict_tensor
    return out


def openvino_runners(bundle_dir: Path, threads: int, int8_path: Path, names: list[str]) -> dict:
    """OpenVINO columns: model.onnx in f32 and bf16 (native bf16 CPUs only; elsewhere the column is left
    out rather than timing fp32 under a bf16 label) and the int8 QDQ model, each compiled explicitly."""
    from export import openvino_backend as ovb

    out = {}
    if "openvino_f32" in names:
        out["openvino_f32"] = export.load_bundle(bundle_dir, backend="openvino", threads=threads,
                                                 precision="fp32").predict_tensor
    if "openvino_bf16" in names and ovb.cpu_native_bf16():
        out["openvino_bf16"] = export.load_bundle(bundle_dir, backend="openvino", threads=threads,
                                                  precision="bf16").predict_tensor
    if "openvino_int8" in names:
        out["openvino_int8"] = ovb.open_openvino(int8_path, threads, "fp32")
    return out


def runners(bundle_dir: Path, threads: int, int8_path: Path, names: list[str] = BACKENDS) -> dict:
    manifest = export.read_manifest(bundle_dir)
    loaded = export.load_bundle(bundle_dir, backend="eager", threads=threads)
    from trainer.inference import model_from_checkpoint

    net = probability_model(model_from_checkpoint(manifest["provenance"]["checkpoint"]).model,
                            preprocess_spec(manifest))
    net_cl = net.to(memory_format=torch.channels_last)

    def eager_cl(x):
        with torch.inference_mode():
            return net_cl(x.contiguous(memory_format=torch.channels_last))

    out = {"eager": loaded.predict_tensor, "eager_channels_last": eager_cl}
    for name, backend in (("torchscript", "torchscript"), ("onnxruntime", "onnxruntime"), ("pt2", "pt2")):
        if name in names:
            out[name] = export.load_bundle(bundle_dir, backend=backend, threads=threads).predict_tensor
    if "onnxruntime_int8" in names:
        out["onnxruntime_int8"] = open_runtime(int8_path, "onnx", threads=threads)
    out.update(openvino_runners(bundle_dir, threads, int8_path, names))
    torch.set_num_threads(threads)
    return out


def formats_for(names: list[str]) -> list[str]:
    """The artifact formats the asked-for columns run (ONNX for every ONNX Runtime / OpenVINO column)."""
    need = {"torchscript": "torchscript", "pt2": "pt2"}
    fmts = [need[n] for n in names if n in need]
    return fmts + (["onnx"] if any(n.startswith(("onnxruntime", "openvino")) for n in names) else [])


def bench_model(arch: str, args, work: Path) -> dict:
    ckpt = untrained_checkpoint(work / f"{arch}.pt", arch, args.img_size, args.num_classes)
    cuda = args.device.startswith("cuda")
    opts = ExportOptions(str(ckpt), str(work / arch), formats_for(args.backends), max_batch=max(args.batches),
                         force=True,
                         device=args.device, precisions=args.precisions if cuda else ["fp32"], verify=not cuda)
    bundle, manifest = build_bundle(opts, say=print)
    spec = preprocess_spec(manifest)
    # int8 outside the bundle: an export's int8 must pass a top-1 check on labelled images, which random
    # weights cannot; its speed is the same (int8_accuracy below measures top-1 on a trained model)
    int8_path = work / f"{arch}.int8.onnx"
    t0 = time.perf_counter()
    if any(n.endswith("int8") for n in args.backends):
        quantize_int8(bundle / manifest["artifacts"]["onnx"]["file"], int8_path,
                      calibration_images(spec, args.calibration, args.calibration_count).images)
    int8_seconds = time.perf_counter() - t0
    fns = runners(bundle, args.threads, int8_path, args.backends)
    names = [n for n in dict.fromkeys(["eager", *args.backends]) if n in fns]
    if cuda:
        fns.update(cuda_runners(bundle, args.device, args.precisions))
        names += cuda_backends(args.precisions)
    rows = []
    for bs in args.batches:
        x = example_batch(spec, bs, seed=1)
        for name in names:
            sec = time_call(fns[name], x, args.warmup, args.repeats, args.min_seconds)
            rows.append({"model": arch, "batch": bs, "backend": name, "latency_ms": 1000 * sec, "images_per_s": bs / sec})
            print(f"{arch:20s} batch {bs:3d} {name:20s} {1000 * sec:9.2f} ms {bs / sec:9.1f} img/s", flush=True)
    export_seconds = {k: a["export_seconds"] for k, a in manifest["artifacts"].items()} | {"onnx_int8": int8_seconds}
    return {"rows": rows, "export_seconds": export_seconds}


def int8_accuracy(args, work: Path) -> dict | None:
    if not args.accuracy_checkpoint:
        return None
    _, m = build_bundle(ExportOptions(args.accuracy_checkpoint, str(work / "accuracy"), ["onnx"], quantize="int8",
                                      calibration=args.accuracy_calibration or args.calibration,
                                      data=args.accuracy_data, calibration_count=args.calibration_count,
                                      max_accuracy_drop=100.0), say=print)  # measured here, not gated
    q = m["artifacts"]["onnx_int8"]["quantization"]
    return {k: q.get(k) for k in ("top1_fp32", "top1_int8", "top1_drop", "validation_images", "calibration_images",
                                  "calibrate_method", "validation_source", "calibration_source")} | {"architecture": m["architecture"]}


def markdown(rows: list[dict]) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    lines = ["| model | batch | " + " | ".join(backends) + " |", "|---|---:|" + "---:|" * len(backends)]
    keyed = {(r["model"], r["batch"], r["backend"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for bs in dict.fromkeys(r["batch"] for r in rows):
            base = keyed[(model, bs, "eager")]["latency_ms"]
            cells = [f"{keyed[(model, bs, b)]['latency_ms']:.1f} ms ({base / keyed[(model, bs, b)]['latency_ms']:.2f}x)"
                     for b in backends]
            lines.append(f"| {model} | {bs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    keyed = {(r["model"], r["batch"], r["backend"]): r["images_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(groups)), 4.5))
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        ax.bar(np.arange(len(groups)) + i * width, [keyed[(m, bs, b)] for m, bs in groups], width, label=b)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{m}\nbatch {bs}" for m, bs in groups], fontsize=7)
    ax.set_ylabel("images / s (higher is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS,
                   help="CPU columns to measure (eager always: the ratios' base)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration", required=True, help="folder of calibration images for int8")
    p.add_argument("--calibration-count", type=int, default=64)
    p.add_argument("--accuracy-checkpoint", help="trained checkpoint to measure int8 top-1 loss on")
    p.add_argument("--accuracy-data", help="its dataset (validation split)")
    p.add_argument("--accuracy-calibration", help="calibration images for it (default: --calibration)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="warmup 2, repeats 5, min 0.5 s per measurement")
    p.add_argument("--device", default="cpu", help="cuda[:N]: add GPU columns (CUDA artifacts, ONNX Runtime CUDA EP)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], help="CUDA artifact precisions (--device cuda)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", help="keep the exported bundles here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.min_seconds = 2, 5, 0.5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "img_size": args.img_size, "torch": str(torch.__version__),
              "device": args.device,
              "gpu": torch.cuda.get_device_name(torch.device(args.device)) if args.device != "cpu" else None,
              "command": " ".join(sys.argv), "rows": [], "export_seconds": {}}
    with tempfile.TemporaryDirectory(prefix="bench-", dir=out) as tmp:
        tmp = args.work or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        result["int8_accuracy"] = int8_accuracy(args, Path(tmp))
        for arch in args.models:
            r = bench_model(arch, args, Path(tmp))
            result["rows"] += r["rows"]
            result["export_seconds"][arch] = r["export_seconds"]
    keyed = {(r["model"], r["batch"], r["backend"]): r["latency_ms"] for r in result["rows"]}
    result["int8_speedup_batch1"] = {m: keyed[(m, 1, "onnxruntime")] / keyed[(m, 1, "onnxruntime_int8")]
                                     for m in args.models if (m, 1, "onnxruntime_int8") in keyed
                                     and (m, 1, "onnxruntime") in keyed}
    from export import openvino_backend as ovb

    result["cpu"] = ovb.cpu_record().describe()
    best = {}  # images/s at batch 1 and at the best batch, per model and backend
    for r in result["rows"]:
        k = f"{r['model']}/{r['backend']}"
        b = best.setdefault(k, {"batch1": None, "best": 0.0, "best_batch": None})
        b["batch1"] = r["images_per_s"] if r["batch"] == 1 else b["batch1"]
        if r["images_per_s"] > b["best"]:
            b.update(best=r["images_per_s"], best_batch=r["batch"])
    result["images_per_s"] = best
    (out / "backends.json").write_text(json.dumps(result, indent=2))
    table = markdown(result["rows"])
    (out / "backends.md").write_text(table + "\n")
    chart(result["rows"], out / "backends.png")
    print(table)
    print(json.dumps({"int8_speedup_batch1": result["int8_speedup_batch1"], "images_per_s": best,
                      "int8_accuracy": result["int8_accuracy"], "export_seconds": result["export_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
