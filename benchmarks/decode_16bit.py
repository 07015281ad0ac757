"""16-bit grey decode: memory and time of decode_image against the float64 conversion it replaced.

    PYTHONPATH=python python benchmarks/decode_16bit.py --megapixels 40

Writes one 16-bit grey PNG of --megapixels (4:3, ramps over the whole 0..65535 range), then decodes
it --repeat times each way, in this process:

- ``baseline_float64``: PIL decode + the conversion before issue 20 (``np.asarray`` of the whole
  image, ``rint(v / 257.0)`` in float64, ``np.repeat`` to three channels);
- ``decode_image``: ``trainer.data.images.decode_image`` (integers, a band of rows at a time).

Peak memory is what tracemalloc sees (numpy's and Python's allocations; PIL's own decoded image,
2 bytes a pixel, is outside it and the same for both). Both results are compared pixel for pixel.
Prints a table; the last line is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import tracemalloc

import numpy as np
from PIL import Image

from trainer.data.images import decode_image


def baseline_float64(data: bytes) -> np.ndarray:
    """The pre-issue-20 path for a 16-bit grey PNG (kept here only as the baseline)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        arr = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def grey16_png(megapixels: float) -> bytes:
    h = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    w = int(round(megapixels * 1e6 / h))
    ramp = np.arange(w, dtype=np.uint16) * np.uint16(13)
    buf = io.BytesIO()
    Image.fromarray(ramp[None, :] + (np.arange(h, dtype=np.uint16) * np.uint16(7))[:, None]).save(buf, "PNG")
    return buf.getvalue()


def measure(fn, data: bytes, repeat: int) -> tuple[np.ndarray, float, float]:
    """(last result, median seconds, traced peak bytes of the first call)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(data)
    times = [time.perf_counter() - t0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for _ in range(repeat - 1):
        del out   # one result alive at a time
        t0 = time.perf_counter()
        out = fn(data)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megapixels", type=float, default=40.0)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    data = grey16_png(a.megapixels)
    rows = {}
    ref = None
    for name, fn in (("baseline_float64", baseline_float64), ("decode_image", decode_image)):
        out, median_s, peak = measure(fn, data, a.repeat)
        rows[name] = {"median_s": round(median_s, 3), "peak_traced_mb": round(peak / 1e6, 1),
                      "result_mb": round(out.nbytes / 1e6, 1)}
        if ref is None:
            ref = out
        else:
            rows[name]["identical_to_baseline"] = bool(np.array_equal(out, ref))
        del out
    base = rows["baseline_float64"]
    print(f"16-bit grey PNG, {a.megapixels:g} MP ({len(data) / 1e6:.1f} MB file), {a.repeat} runs each")
    print(f"{'path':<18} {'median s':>9} {'peak traced MB':>15} {'result MB':>10}")
    for name, r in rows.items():
        print(f"{name:<18} {r['median_s']:>9.3f} {r['peak_traced_mb']:>15.1f} {r['result_mb']:>10.1f}")
    summary = {"megapixels": a.megapixels, **rows,
               "peak_ratio": round(rows["decode_image"]["peak_traced_mb"] / base["peak_traced_mb"], 3),
               "time_ratio": round(rows["decode_image"]["median_s"] / base["median_s"], 3)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
