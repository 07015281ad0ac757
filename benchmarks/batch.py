"""Batch prediction throughput: python -m batch's embedded default vs trainer predict vs a plain loop over
load_bundle, Ray Data with 2 local workers vs embedded, and the cost of a resume, on the same images.

    python benchmarks/batch.py --bundle bundles/digits --data data/digits --images 2000
    python benchmarks/batch.py --bundle bundles/digits --data data/digits --images 400 --no-ray   # quicker

The images are real-sized JPEGs made from the dataset's validation images: each upscaled (bicubic) to
500x375 RGB with a little seeded noise (so the JPEG does not compress to nothing) at quality 90, which
is what decoding costs on real photos. Sides, one after the other in this process, each timed from
loading the model to the last row:

- ``plain_loop``: ``load_bundle(...)`` then ``bundle.predict(path)`` for each image (the baseline);
- ``trainer_predict``: ``trainer.predict.predict_checkpoint`` on the bundle's source checkpoint (eager
  PyTorch, its default workers), which is what ``python -m trainer predict`` runs;
- ``embedded``: ``batch.run_batch`` with its defaults (one decode worker per core, the auto backend);
- ``ray``: the same job on a local Ray instance started with ``--ray-cpus`` CPUs and as many actors, in
  its own process (start-up of Ray itself reported apart, not in the rate; the time to the first
  part, which includes the actors' start-up, reported too);
- ``resume``: the embedded job stopped after half its parts (an exception from the part hook, as a
  crash) and run again: the two runs' time against one uninterrupted run, and the time to read the
  done-manifest back.

The last line of output is the JSON result.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "python"), str(REPO)]


def make_images(data: Path, out: Path, n: int, size=(500, 375), seed: int = 0) -> list[str]:
    from PIL import Image

    sources = sorted(p for p in (data / "val").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not sources:
        raise SystemExit(f"{data}/val: no images (python -m trainer demo-data --out {data})")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("RGB").resize(size, Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (size[1], size[0], 3), dtype=np.int16)
        path = out / f"{i // 500:03d}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


RAY_SIDE = """
import json, os, sys, time
import ray
from batch import BatchOptions, run_batch
bundle, images, out, backend, cpus = sys.argv[1:6]
t0 = time.perf_counter()
ray.init(num_cpus=int(cpus), include_dashboard=False, address="local", log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
t1 = time.perf_counter()
stamps = []  # the time of each committed part: the first one says how long the actors took to start
summary = run_batch(BatchOptions(bundle=bundle, images=images, out=out, backend=backend, progress=False,
                                 ray_address="auto", ray_workers=int(cpus), part_size=int(sys.argv[6])),
                    on_part=lambda path, parts: stamps.append(time.perf_counter()))
t2 = time.perf_counter()
ray.shutdown()
print(json.dumps({"ray_start_s": round(t1 - t0, 1), "seconds": t2 - t1, "first_part_s": round(stamps[0] - t1, 1)}))
"""


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def side_plain_loop(bundle: str, paths: list[str], backend: str) -> float:
    from export import load_bundle

    def run():
        model = load_bundle(bundle, backend=backend)
        for p in paths:
            model.predict(p, topk=5)

    return timed(run)[0]


def side_trainer_predict(checkpoint: str, images: str) -> float:
    from trainer.predict import predict_checkpoint

    return timed(lambda: predict_checkpoint(checkpoint, images, device="cpu", progress=False))[0]


def side_batch(opts) -> tuple[float, object]:
    from batch import run_batch

    return timed(lambda: run_batch(opts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="a dataset with val/ images to make the JPEGs from")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--checkpoint", default=None, help="for trainer predict (default: the bundle's source checkpoint)")
    ap.add_argument("--backend", default="auto", help="the backend of every bundle side")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the images and outputs (default: a temporary one)")
    args = ap.parse_args(argv)

    from batch import BatchOptions
    from batch.job import job_identity
    from batch.output import OutputFolder
    from export.manifest import read_manifest

    work = Path(args.work or tempfile.mkdtemp(prefix="batch_bench_"))
    images_dir = work / "images"
    t_make, paths = timed(lambda: make_images(Path(args.data), images_dir, args.images))
    print(f"{len(paths)} JPEGs of 500x375 in {images_dir} ({t_make:.1f} s to write)", flush=True)
    checkpoint = args.checkpoint or read_manifest(args.bundle)["provenance"].get("checkpoint")
    n = len(paths)
    result = {"images": n, "cores": len(os.sched_getaffinity(0)), "backend": args.backend, "sides": {}}

    def record(name, seconds, **extra):
        result["sides"][name] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1), **extra}
        print(f"{name:16s} {n / seconds:8.1f} images/s  ({seconds:.1f} s)", flush=True)

    def opts(out, **kw):
        return BatchOptions(bundle=args.bundle, images=str(images_dir), out=str(work / out), backend=args.backend,
                            progress=False, **kw)

    record("plain_loop", side_plain_loop(args.bundle, paths, args.backend))
    if checkpoint and Path(checkpoint).is_file():
        record("trainer_predict", side_trainer_predict(checkpoint, str(images_dir)))
    else:
        print(f"trainer predict skipped: no checkpoint {checkpoint!r} (pass --checkpoint)")
    seconds, _ = side_batch(opts("embedded"))
    record("embedded", seconds)

    # resume: parts of a tenth of the job, stopped after five of them
    part = max(1, n // 10)

    class Stop(Exception):
        pass

    def stop_at_half(path, parts):
        if parts == 5:
            raise Stop

    from batch import run_batch

    t0 = time.perf_counter()
    try:
        run_batch(opts("resume", part_size=part), on_part=stop_at_half)
    except Stop:
        pass
    first = time.perf_counter() - t0
    second, summary = side_batch(opts("resume", part_size=part))
    uninterrupted, _ = side_batch(opts("whole", part_size=part))
    folder = OutputFolder(work / "resume", job_identity(opts("resume", part_size=part)))
    t_manifest, done = timed(folder.done_paths)
    folder.close()
    assert len(done) == n and summary.skipped == 5 * part
    result["resume"] = {"first_half_s": round(first, 2), "second_half_s": round(second, 2),
                        "uninterrupted_s": round(uninterrupted, 2),
                        "overhead_pct": round(100 * (first + second - uninterrupted) / uninterrupted, 1),
                        "read_done_manifest_s": round(t_manifest, 3), "parts": 10}
    print(f"resume: {first:.1f} + {second:.1f} s against {uninterrupted:.1f} s uninterrupted; done-manifest of "
          f"{n} rows read in {t_manifest * 1000:.0f} ms", flush=True)

    if not args.no_ray:
        # its own process: Ray puts the driver script's folder on its workers' path, and this file's name
        # (batch.py) would shadow the batch package there
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO)]))
        proc = subprocess.run([sys.executable, "-c", RAY_SIDE, args.bundle, str(images_dir), str(work / "ray"),
                               args.backend, str(args.ray_cpus), str(max(1, n // 10))], env=env, cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the Ray side failed:\n{proc.stderr[-4000:]}")
        ray_result = json.loads(proc.stdout.strip().splitlines()[-1])
        record("ray", ray_result["seconds"], ray_start_s=ray_result["ray_start_s"], actors=args.ray_cpus,
               first_part_s=ray_result["first_part_s"])

    base = result["sides"]["plain_loop"]["seconds"]
    for side in result["sides"].values():
        side["speedup_vs_plain_loop"] = round(base / side["seconds"], 2)
    if "ray" in result["sides"]:
        result["ray_vs_embedded"] = round(result["sides"]["embedded"]["seconds"] / result["sides"]["ray"]["seconds"], 2)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
