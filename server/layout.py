"""How the embedded server runs a model on this machine: runners, intra-op threads, the lone-batch
session and the batch limit, chosen at start-up unless the flags say otherwise.

    python -m server --bundle bundles/resnet50     # no tuning flags: backend, precision and layout chosen at start-up
    curl -s http://127.0.0.1:8000/models           # each model's "layout": values, which were chosen, why

The decision rule (``choose_layout``) is a pure function of the flags, the usable cores, whether the
backend takes concurrent calls (onnxruntime sessions do; other backends run one call at a time) and
a start-up measurement (``measure_timings``, ~1-2 s for resnet50 on 2 cores): the model's images/s
at a small batch as one call with every core ("pooled") against one single-thread call per core
side by side ("split"). Explicit flags always win; the missing ones are filled around them.

Before that, with ``--backend auto --precision auto``, the backend: ``backend_candidates`` lists the
backend x precision pairs the bundle allows (onnxruntime fp32, OpenVINO fp32, OpenVINO bf16 only on a
bundle whose manifest records bf16 verified at export and a CPU with native bf16), each is measured
(``measure_backend``) and ``choose_backend`` keeps onnxruntime fp32, today's default, unless another
is BACKEND_MARGIN faster.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

DEFAULT_MAX_BATCH = 32
# One thread's per-image cost on CPU is lowest at batch 4-8 (mobilenet_v3_large: ~20% dearer at 32;
# embedded-2 at c=64 served 237/242 req/s with --max-batch 8 against 218/232 with 32).
SINGLE_THREAD_MAX_BATCH = 8
# on a GPU, images/s keeps growing with the batch well past what a CPU gains from
GPU_MAX_BATCH = 64
# Split wins unless pooled is clearly faster: in the server the runners overlap each other's model
# calls with the requests' decoding and the HTTP work, and a pooled session's threads spin between
# ops and take CPU from that work, neither of which this measurement (no front) sees. Measured on 2
# cores at c=16: split 1.18x pooled's req/s for mobilenet_v3_large and 1.03x for resnet50, while
# this measurement read 0.94-1.25x and 1.00x for them.
SPLIT_MARGIN = 0.8
# A lone-batch session is worth a second copy of the weights only if it makes batch 1 faster. No
# margin: on a quiet 2-core machine it does (mobilenet_v3_large 4.2 vs 6.9 ms), on a busy one the
# every-core call waits for a preempted thread and can read slower, and dropping it by mistake
# costs more (a lone request on one core) than keeping it (memory).
SOLO_MAX_RATIO = 1.0
# pause before timing the side-by-side calls (see measure_timings)
SPIN_SETTLE_S = 0.05
MEASURE_BATCH = 4


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True)
class LayoutRequest:
    """The tuning flags as given; None: the server chooses."""
    threads: int | None = None
    runners: int | None = None
    solo_threads: int | None = None
    max_batch: int | None = None

    def needs_measurement(self, cores: int) -> bool:
        return self.threads is None and self.runners is None and cores > 1


@dataclass(frozen=True)
class LayoutTimings:
    """Start-up measurement. Throughput at `batch` rows per call; batch-1 latency."""
    batch: int
    pooled_images_per_s: float   # one call at a time on a session with every core
    split_images_per_s: float    # one single-thread call per core side by side
    pooled_batch1_ms: float      # a lone request on the session with every core
    single_batch1_ms: float      # a lone request on one thread
    seconds: float = 0.0         # how long the measurement took


@dataclass(frozen=True)
class Layout:
    runners: int
    threads: int
    solo_threads: int
    max_batch: int
    chosen: tuple[str, ...] = ()           # the fields the server chose (the others came from flags)
    reason: str = ""
    timings: LayoutTimings | None = field(default=None, compare=False)
    backend: "BackendChoice | None" = field(default=None, compare=False)   # auto's backend choice (None: given)

    def describe(self) -> dict:
        d = {"runners": self.runners, "threads": self.threads, "solo_threads": self.solo_threads,
             "max_batch": self.max_batch, "auto": list(self.chosen), "reason": self.reason}
        if self.backend is not None:
            d["backend"] = self.backend.describe()
        if self.timings is not None:
            d["measured"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self.timings).items()}
        return d

    def summary(self) -> str:
        took = f" (measured in {self.timings.seconds:.1f} s)" if self.timings is not None else ""
        chose = (f"backend {self.backend.backend} {self.backend.precision} ({self.backend.reason}); "
                 if self.backend is not None else "")
        return chose + (f"runners {self.runners} x {self.threads} thread(s), solo session "
                        f"{self.solo_threads or 'none'}, "
                f"max batch {self.max_batch} (auto: {', '.join(self.chosen) or 'none'}): {self.reason}{took}")


def choose_layout(req: LayoutRequest, cores: int, timings: LayoutTimings | None = None, *,
                  concurrent_ok: bool = True, backend: str = "") -> Layout:
    """The decision rule. Flags given in ``req`` are kept; the rest:
    - not concurrent (torchscript, pt2): one runner with every core, no solo session;
    - --threads only: one runner (the flag caps the model's cores); --runners only: cores / runners each;
    - neither: split (one single-thread runner per core, plus a solo session with every core if it
      makes batch 1 faster) when it gives at least SPLIT_MARGIN of pooled's images/s, else pooled;
      without timings (nothing measured), the pooled layout;
    - max batch 8 when runners have one thread, else 32."""
    chosen = [k for k in ("runners", "threads", "solo_threads", "max_batch") if getattr(req, k) is None]
    split = False
    if not concurrent_ok:
        runners, threads = req.runners or 1, req.threads or cores
        reason = f"backend {backend or '?'} runs one call at a time"
    elif req.threads is not None or req.runners is not None:
        runners = req.runners or 1
        threads = req.threads or max(1, cores // runners)
        reason = "from --threads/--runners" if req.threads and req.runners else \
                 f"{cores} cores; filled in around the flags given"
    elif cores == 1:
        runners, threads, reason = 1, 1, "1 core"
    elif timings is None:
        runners, threads, reason = 1, cores, f"{cores} cores, nothing measured: one runner with every core"
    else:
        ratio = timings.split_images_per_s / timings.pooled_images_per_s
        split = ratio >= SPLIT_MARGIN
        runners, threads = (cores, 1) if split else (1, cores)
        reason = (f"{cores} cores; at batch {timings.batch} {cores} single-thread calls side by side gave "
                  f"{ratio:.2f}x the images/s of one {cores}-thread call "
                  f"({timings.split_images_per_s:.1f} vs {timings.pooled_images_per_s:.1f})")
    if runners < 2 or not concurrent_ok:   # no runners to stand in for / no concurrent sessions
        solo = 0
    elif req.solo_threads is not None:
        solo = req.solo_threads
    else:
        solo = min(threads * runners, cores)
        solo = solo if solo > threads else 0
        if solo and split and timings.pooled_batch1_ms > SOLO_MAX_RATIO * timings.single_batch1_ms:
            solo = 0
            reason += (f"; no solo session (batch 1: {timings.pooled_batch1_ms:.2f} ms on {cores} threads vs "
                       f"{timings.single_batch1_ms:.2f} on one)")
    max_batch = req.max_batch or (SINGLE_THREAD_MAX_BATCH if threads == 1 and runners > 1 else DEFAULT_MAX_BATCH)
    return Layout(runners, threads, solo, max_batch, tuple(chosen), reason, timings)


def device_layout(req: LayoutRequest, device: str) -> Layout:
    """A model on a CUDA device: nothing to split across cores. One runner (the device runs one
    batch at a time anyway; a second would only queue kernels behind the first), its CPU threads
    only feed the device, and larger batches, which a GPU turns into throughput where a CPU does not."""
    chosen = tuple(k for k in ("runners", "threads", "solo_threads", "max_batch") if getattr(req, k) is None)
    return Layout(req.runners or 1, req.threads or 1, 0, req.max_batch or GPU_MAX_BATCH, chosen,
                  f"model on {device}: one runner, batches up to {req.max_batch or GPU_MAX_BATCH} rows")


def _call_ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def measure_timings(single: Callable[[np.ndarray], object], pooled: Callable[[np.ndarray], object],
                    shape: tuple[int, int, int], cores: int, batch: int = MEASURE_BATCH,
                    budget_s: float = 1.5, max_rounds: int = 5) -> LayoutTimings:
    """Time a 1-thread and a `cores`-thread session on synthetic uint8 input of `shape` (C, H, W):
    rounds of [pooled batch 1, single batch 1, pooled batch `batch`, `cores` side-by-side single
    calls of `batch`], interleaved so that a shared machine's drift hits both alike, at least two
    rounds and more while under `budget_s`; the fastest of each (noise only ever adds time)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 256, (1, *shape), dtype=np.uint8)
    xb = np.repeat(x1, batch, axis=0)

    def side_by_side() -> None:
        start = threading.Barrier(cores)

        def call():
            start.wait()
            single(xb)
        ts = [threading.Thread(target=call) for _ in range(cores)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    for f, x in ((pooled, x1), (single, x1), (pooled, xb)):   # first calls allocate per shape
        f(x)
    side_by_side()
    best = {"p1": math.inf, "s1": math.inf, "pb": math.inf, "sb": math.inf}
    rounds = 0
    while rounds < 2 or (rounds < max_rounds and time.perf_counter() - t0 < budget_s):
        best["p1"] = min(best["p1"], _call_ms(lambda: pooled(x1)))
        best["s1"] = min(best["s1"], _call_ms(lambda: single(x1)))
        best["pb"] = min(best["pb"], _call_ms(lambda: pooled(xb)))
        # an intra-op pool may keep spinning on its cores for a while after a pooled call (OpenMP's do;
        # onnxruntime's did before export.formats.ORT_SPIN_STOP); timed right after it, the side-by-side
        # calls shared their cores with that spin and read 0.5-0.7x of pooled instead of the 0.95x they
        # get alone (mobilenet_v3_large, 2 cores)
        time.sleep(SPIN_SETTLE_S)
        best["sb"] = min(best["sb"], _call_ms(side_by_side))
        rounds += 1
    return LayoutTimings(batch=batch, pooled_images_per_s=batch * 1e3 / best["pb"],
                         split_images_per_s=cores * batch * 1e3 / best["sb"], pooled_batch1_ms=best["p1"],
                         single_batch1_ms=best["s1"], seconds=time.perf_counter() - t0)


# ---- which backend x precision runs the model (embedded mode, --backend auto --precision auto) ---------
# Today's default. Another candidate replaces it only when it measures at least BACKEND_MARGIN times
# its images/s: a start-up measurement on a busy machine reads +-5-10%, and picking a backend that is
# really no faster would make the default slower on a bad draw (the rule: never slower than today).
BASELINE = ("onnxruntime", "fp32")
BACKEND_MARGIN = 1.10


@dataclass(frozen=True)
class BackendTiming:
    backend: str
    precision: str
    images_per_s: float        # one call of MEASURE_BATCH rows on every core
    batch1_ms: float           # a lone image on every core


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    precision: str
    reason: str
    candidates: tuple[tuple[str, str], ...] = ()
    timings: tuple[BackendTiming, ...] = ()

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "reason": self.reason,
                "candidates": [f"{b}/{p}" for b, p in self.candidates],
                "measured": {f"{t.backend}/{t.precision}": {"images_per_s": round(t.images_per_s, 2),
                                                            "batch1_ms": round(t.batch1_ms, 3)}
                             for t in self.timings}}


def backend_candidates(artifacts, bf16_verified: bool, native_bf16: bool,
                       have_openvino: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """-> (the backend x precision pairs auto may run for a bundle with these ``artifacts``, why each other
    one is out). Only fp32, or a precision the bundle verified at export AND the CPU runs natively (a CPU
    record faked in tests plays one without bf16); int8 never (its accuracy is a separate choice: --backend
    onnxruntime-int8 / openvino-int8)."""
    if "onnx" not in artifacts:
        return [], ["no model.onnx: the first of pt2, torchscript (export.load_bundle auto)"]
    out, why = [BASELINE], []
    if not have_openvino:
        return out, ["openvino is not installed"]
    out.append(("openvino", "fp32"))
    if not bf16_verified:
        why.append("bf16: the bundle records no bf16 verification (export --verify-precision bf16)")
    elif not native_bf16:
        why.append("bf16: this CPU has no native bf16 (AVX-512 BF16 / AMX)")
    else:
        out.append(("openvino", "bf16"))
    return out, why


def choose_backend(timings: list[BackendTiming], excluded: list[str] = ()) -> BackendChoice:
    """The fastest measured candidate by images/s among those that beat the baseline (onnxruntime fp32)
    on both counts: BACKEND_MARGIN times its images/s, and a lone image no slower (a backend that wins
    batches but loses batch 1 would make a quiet server's answers slower); the baseline when none does."""
    base = next((t for t in timings if (t.backend, t.precision) == BASELINE), None)
    cands = tuple((t.backend, t.precision) for t in timings)
    note = f"; not tried: {'; '.join(excluded)}" if excluded else ""
    if base is None:
        best = max(timings, key=lambda t: t.images_per_s)
        return BackendChoice(best.backend, best.precision, f"fastest measured{note}", cands, tuple(timings))
    better = [t for t in timings if t is not base and t.images_per_s >= BACKEND_MARGIN * base.images_per_s
              and t.batch1_ms <= base.batch1_ms]
    if not better:
        return BackendChoice(*BASELINE, f"no candidate reached {BACKEND_MARGIN:.2f}x onnxruntime fp32's "
                             f"{base.images_per_s:.1f} images/s at batch {MEASURE_BATCH} with batch 1 no slower than "
                             f"its {base.batch1_ms:.1f} ms{note}", cands, tuple(timings))
    best = max(better, key=lambda t: t.images_per_s)
    return BackendChoice(best.backend, best.precision,
                         f"{best.images_per_s / base.images_per_s:.2f}x onnxruntime fp32's images/s "
                         f"({best.images_per_s:.1f} vs {base.images_per_s:.1f}) at batch {MEASURE_BATCH}; batch 1 "
                         f"{best.batch1_ms:.1f} vs {base.batch1_ms:.1f} ms{note}", cands, tuple(timings))


def measure_backend(run: Callable[[np.ndarray], object], shape: tuple[int, int, int], batch: int = MEASURE_BATCH,
                    rounds: int = 3) -> tuple[float, float]:
    """(images/s at ``batch``, batch-1 ms) of one every-core session: the fastest of ``rounds`` calls
    each, after one warm-up call per shape."""
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 256, (1, *shape), dtype=np.uint8)
    xb = np.repeat(x1, batch, axis=0)
    run(x1), run(xb)
    b1 = min(_call_ms(lambda: run(x1)) for _ in range(rounds))
    bb = min(_call_ms(lambda: run(xb)) for _ in range(rounds))
    return batch * 1e3 / bb, b1
