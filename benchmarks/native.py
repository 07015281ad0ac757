"""Native runtime benchmark: C++ end to end vs the Python bundle loader, and raw model times.

    PYTHONPATH=python python benchmarks/native.py --arch resnet50 --img-size 224 --threads 2 --batch 1
    PYTHONPATH=python python benchmarks/native.py --arch resnet50 --threads 16 --batch 1 --device cuda

Builds (once, into --work) an untrained-weights bundle of --arch with TorchScript, .pt2 and ONNX
(no downloads; speed does not depend on the weights), writes --images photo-like JPEGs of 500x375,
then times, on the same images, threads and batch size:

- ``native_e2e``: classify_native.Runtime.predict_files (C++ decode + resize/crop + .pt2 model)
- ``native_model``: Runtime.run_preprocessed on already-preprocessed uint8 (C++ .pt2 model only)
- ``python_e2e``: export.load_bundle(backend="pt2").predict (PIL decode + torch preprocessing + .pt2)
- ``python_pt2_model`` / ``onnxruntime_model`` / ``torchscript_model``: predict_tensor per backend

- ``native_decode_preprocess`` / ``python_decode_preprocess``: decode + resize/crop alone

Each measurement runs in a fresh process with only its runtime loaded (onnxruntime's and OpenMP's
worker threads keep spinning after a run and would slow whichever runtime runs next in the same process).
``--device cuda[:N]``: the bundle also gets CUDA artifacts (exported without parity checks: random
weights make every class tie), and the model and end-to-end measurements run again on the GPU
(``native_e2e@cuda:0``, ...), printed in a column next to the CPU figures (images on the CPU in, as served).
The overhead is reported both directly (``native_decode_preprocess`` / ``native_model``) and as
(native_e2e - native_model) / native_model; target < 15% for resnet50 at 224. Prints a table; the last line is JSON
(also written to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def make_checkpoint(path: Path, arch: str, img_size: int, classes: int) -> Path:
    """A freshly initialised model saved as a training checkpoint (what python -m export reads)."""
    from trainer.data import PreprocessSpec
    from trainer.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from trainer.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, classes, img_size).eval()
    names = [f"class{i}" for i in range(classes)]
    atomic_save({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": classes, "classes": names,
                 "preprocess": PreprocessSpec.for_size(img_size).to_dict(), "config": {"data": "benchmark"},
                 "model": model.state_dict(), "ema": None, "epoch": 0, "best_metric": None, "best_epoch": None,
                 "best_source": "model", "metrics": {}}, path)
    return path


def ensure_bundle(work: Path, arch: str, img_size: int, classes: int, max_batch: int, device: str = "cpu") -> Path:
    from export.build import ExportOptions, build_bundle

    cuda = device.startswith("cuda")
    bundle = work / (f"{arch}-{img_size}" + ("-cuda" if cuda else ""))
    if (bundle / "manifest.json").is_file():
        return bundle
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work / f"{arch}-{img_size}.pt", arch, img_size, classes)
    print(f"building {bundle} (AOTInductor compile takes a while) ...", file=sys.stderr)
    build_bundle(ExportOptions(checkpoint=str(ckpt), out=str(bundle), formats=["torchscript", "pt2", "onnx"],
                               max_batch=max_batch, force=True, device=device, verify=not cuda),
                 say=lambda *a, **k: print(*a, file=sys.stderr))
    return bundle


def write_images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    y, x = np.mgrid[0:375, 0:500].astype(np.float64)
    for i in range(n):
        base = np.stack([128 + 100 * np.sin(x / (40 + i) + i), 128 + 100 * np.cos(y / 30), 128 + 90 * np.sin((x + y) / 70)], -1)
        arr = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i:03d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    return paths


def timeit(fn, repeat: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "runs": repeat}


MEASUREMENTS = ["native_decode_preprocess", "python_decode_preprocess", "native_e2e", "native_model", "python_e2e",
                "python_pt2_model", "onnxruntime_model", "torchscript_model"]
DEVICE_MEASUREMENTS = ["native_e2e", "native_model", "python_e2e", "python_pt2_model", "onnxruntime_model",
                       "torchscript_model"]  # also run on the GPU with --device cuda, as NAME@cuda:N


def measure(name: str, bundle: Path, batches: list[list[str]], threads: int, batch: int, repeat: int) -> dict:
    """Time one measurement (see the module docstring), loading only the runtime it needs."""
    import classify_native
    from export import load_bundle

    name, _, device = name.partition("@")
    device = device or "cpu"
    rt = classify_native.Runtime(str(bundle), format="pt2", tta="none", threads=threads, batch=batch, device=device)
    pre = rt.preprocessing

    def per_batch(fn):
        return lambda: [fn(i) for i in range(len(batches))]

    if name == "native_decode_preprocess":  # decode + resize/crop alone: the overhead measured directly
        return timeit(per_batch(lambda i: [classify_native.preprocess(
            classify_native.decode_file(p), pre["crop_size"], pre["resize_size"], pre["interpolation"],
            resize_kernel=pre["resize_kernel"])
            for p in batches[i]]), repeat)
    if name == "native_e2e":
        return timeit(per_batch(lambda i: rt.predict_files(batches[i])), repeat)
    # The exact uint8 rows the model sees, per batch (same for every backend).
    rows = [np.stack([classify_native.preprocess(classify_native.decode_file(p), pre["crop_size"],
                                                 pre["resize_size"], pre["interpolation"],
                                                 resize_kernel=pre["resize_kernel"])[0] for p in b])
            for b in batches]
    if name == "native_model":
        return timeit(per_batch(lambda i: rt.run_preprocessed(rows[i])), repeat)
    del rt  # the Python measurements run without the native runtime loaded
    rows_t = [torch.from_numpy(r) for r in rows]
    backend = {"python_e2e": "pt2", "python_pt2_model": "pt2", "python_decode_preprocess": "pt2",
               "onnxruntime_model": "onnxruntime", "torchscript_model": "torchscript"}[name]
    py = load_bundle(bundle, backend=backend, tta="none", threads=threads, device=device)
    if name == "python_decode_preprocess":
        from trainer.data.images import decode_image
        from trainer.data.transforms import eval_transform

        return timeit(per_batch(lambda i: [eval_transform(decode_image(p), py.spec) for p in batches[i]]), repeat)
    if name == "python_e2e":
        return timeit(per_batch(lambda i: py.predict(batches[i])), repeat)
    return timeit(per_batch(lambda i: py.predict_tensor(rows_t[i])), repeat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--bundle", help="use this bundle instead of building one (needs pt2, torchscript, onnx)")
    ap.add_argument("--work", default="benchmarks/results/native_work")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10, help="timed passes over all images")
    ap.add_argument("--out", default="benchmarks/results/native.json")
    ap.add_argument("--device", default="cpu", help="cuda[:N]: also time the model on the GPU, next to the CPU")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: one measurement (NAME[@DEVICE]), JSON out
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    bundle = Path(a.bundle) if a.bundle else ensure_bundle(work, a.arch, a.img_size, a.classes, max(8, a.batch),
                                                           a.device)
    paths = write_images(work / "images", a.images)
    batches = [paths[i:i + a.batch] for i in range(0, len(paths), a.batch)]
    if a.only:
        print(json.dumps(measure(a.only, bundle, batches, a.threads, a.batch, a.repeat)))
        return 0
    # One fresh process per measurement: runtimes that share a process disturb each other (onnxruntime's
    # and OpenMP's worker threads spin after a run, taking the cores the next runtime needs).
    res = {}
    gpu = [f"{n}@{a.device}" for n in DEVICE_MEASUREMENTS] if a.device != "cpu" else []
    for name in MEASUREMENTS + gpu:
        cmd = [sys.executable, __file__, "--bundle", str(bundle), "--work", str(work), "--images", str(a.images),
               "--device", a.device,
               "--threads", str(a.threads), "--batch", str(a.batch), "--repeat", str(a.repeat), "--only", name]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[name] = json.loads(out.strip().splitlines()[-1])
    nb = len(batches)
    for v in res.values():  # per batch of --batch images
        v["median_ms"] /= nb
        v["min_ms"] /= nb
    def ratios(stat: str) -> dict:
        e2e, model = res["native_e2e"][stat], res["native_model"][stat]
        return {"native_overhead_vs_model": (e2e - model) / model,
                "native_decode_preprocess_vs_model": res["native_decode_preprocess"][stat] / model,
                "python_decode_preprocess_vs_model": res["python_decode_preprocess"][stat] / model,
                "python_overhead_vs_model": (res["python_e2e"][stat] - res["python_pt2_model"][stat])
                / res["python_pt2_model"][stat],
                "native_e2e_speedup_vs_python": res["python_e2e"][stat] / e2e,
                "native_pt2_vs_onnxruntime": res["onnxruntime_model"][stat] / model}

    # Medians are the headline; minima are the better estimate on a machine shared with other jobs.
    summary = {
        "arch": a.arch, "img_size": a.img_size, "threads": a.threads, "batch": a.batch, "images": a.images,
        "image_size": [375, 500], "bundle": str(bundle), "device": a.device, "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0], "results": res, **ratios("median_ms"), "from_min": ratios("min_ms"),
    }
    if gpu:  # side by side: CPU and GPU medians per measurement, and the speed-up
        summary["gpu"] = torch.cuda.get_device_name(torch.device(a.device))
        summary["cpu_vs_gpu"] = {n: {"cpu_ms": res[n]["median_ms"], "gpu_ms": res[f"{n}@{a.device}"]["median_ms"],
                                     "speedup": res[n]["median_ms"] / res[f"{n}@{a.device}"]["median_ms"],
                                     "gpu_images_per_s": a.batch * 1000 / res[f"{n}@{a.device}"]["median_ms"]}
                                 for n in DEVICE_MEASUREMENTS}
        print(f"{'measurement':<22}{'cpu ms/batch':>14}{a.device + ' ms':>14}{'speed-up':>10}")
        for n, v in summary["cpu_vs_gpu"].items():
            print(f"{n:<22}{v['cpu_ms']:>14.2f}{v['gpu_ms']:>14.2f}{v['speedup']:>9.1f}x")
    print(f"{'measurement':<22}{'median ms/batch':>16}{'min':>10}")
    for k, v in res.items():
        print(f"{k:<22}{v['median_ms']:>16.2f}{v['min_ms']:>10.2f}")
    for label, r in (("median", summary), ("min", summary["from_min"])):
        print(f"[{label}] decode+preprocess alone: native {r['native_decode_preprocess_vs_model']:.1%}, python "
              f"{r['python_decode_preprocess_vs_model']:.1%} of the native .pt2 model time")
        print(f"[{label}] native e2e - model: {r['native_overhead_vs_model']:.1%} of model time "
              f"(python: {r['python_overhead_vs_model']:.1%}); native e2e {r['native_e2e_speedup_vs_python']:.2f}x "
              f"python; onnxruntime/native-pt2 time ratio {r['native_pt2_vs_onnxruntime']:.2f} (>= 1: pt2 as fast)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
