"""One memory budget for the process: the bytes that decoding and preprocessing may hold at once.

Per-request limits (``server.limits``) bound one request; they do not bound 64 requests at once:
16 concurrent 36-megapixel PNGs (100 kB each on the wire, each under ``--max-pixels``) took the
serving process to 4.9-5.8 GiB. So every request, on every route and in both modes (they all decode
in ``InferenceService.decode``), reserves its decoding memory here before the first pixel is
decoded, from its image headers (``decode_cost``), and gives it back when its pixels are a batch
of crops:

- a request that fits is admitted at once; otherwise it waits, first come first served, while its
  deadline (``--timeout-s``) still leaves time to decode it at the rate the recent large requests
  were decoded; then it gets 503 with ``Retry-After`` (the budget is busy, retrying later fits);
- at most one more budget's worth of requests waits: beyond that a request gets the 503 at once
  (it would wait at least two rounds of decoding, and its thread and body are better given back);
- a request that needs more than the whole budget gets 413 naming ``--max-decode-memory`` (it could
  never fit);
- the default budget is a quarter of the process's memory limit (``server.memory.memory_limit``:
  cgroup v2 ``memory.max``, cgroup v1 ``memory.limit_in_bytes``, else the physical memory), which
  leaves the rest for the models, the request bodies, the batches and the interpreter.

A request's cost is its peak working memory: the largest image's peak (images of one request
decode one after the other) plus the crops every image leaves (twice: the per-image blocks and
their concatenation). The peaks per pixel (``DECODE_BYTES_PER_PIXEL``, ``PREPROCESS_BYTES_PER_PIXEL``)
were measured with the server's decoder and malloc settings on 2000x2000 and 3000x3000 images of
each mode, as the growth of the kernel's peak RSS (VmHWM), and rounded up by about 10%;
``tests/server/test_server_budget.py`` measures them again: every estimate must stay at or above
the measured peak (and within 4x of it).
"""
from __future__ import annotations

import collections
import threading
import time
from contextlib import contextmanager

from trainer.data.transforms import PreprocessSpec, resized_shape
from trainer.tta import TTAView

from .errors import APIError
from .limits import Deadline

MiB = 1 << 20
NO_TTA = [TTAView()]
# the share of the memory limit that decoding may hold when --max-decode-memory is not given
DEFAULT_SHARE = 0.25

# Bytes per decoded pixel, measured (tests/server/test_server_budget.py measures them again): the
# peak while an image is decoded to an (H, W, 3) uint8 array, and what decoding leaves resident
# (freed but kept by malloc, not reusable by the resize's large blocks) while it is preprocessed.
# JPEG RGB/L decode through libjpeg-turbo straight into the array (3 B/px; 6 with an EXIF-rotated
# copy) and leave nothing; the rest go through PIL: its image (4 B/px for RGB-like modes, plus a
# mode conversion), tobytes()'s chunks and their join, and the array.
DECODE_BYTES_PER_PIXEL = {   # mode (or (format, mode)) -> (decoding peak, left resident)
    ("JPEG", "RGB"): (6, 0), ("JPEG", "L"): (6, 0),
    "RGB": (15, 7), "RGBX": (15, 7), "L": (16, 8), "1": (16, 8), "LA": (17, 9), "La": (17, 9),
    "P": (17, 9), "PA": (19, 11), "RGBA": (19, 11), "RGBa": (19, 11), "CMYK": (19, 11), "YCbCr": (19, 11),
    "LAB": (19, 11), "HSV": (19, 11),
    # 16-bit grey, converted in integers: PIL's 2 B/px, the integer arithmetic and the RGB array
    "I;16": (8, 6), "I;16B": (8, 6), "I;16L": (8, 6), "I;16N": (8, 6),
}
# 32-bit modes (I, F) and anything unlisted: what the 16-bit path cost when it went through float64
WORST_BYTES_PER_PIXEL = (40, 24)
# preprocessing the (H, W, 3) array, per decoded pixel: the uint8 kernel reads it in place (a
# channels-last view); TTA views copy it to (3, H, W) and torch's antialiased uint8 resize packs
# that to 4 channels; the float32 kernel makes a float32 copy
PREPROCESS_BYTES_PER_PIXEL = {("uint8", False): 3, ("uint8", True): 15, ("float32", False): 23, ("float32", True): 23}


def default_decode_memory(limit: int) -> int:
    return int(limit * DEFAULT_SHARE)


def bytes_per_pixel(fmt: str, mode: str, spec: PreprocessSpec, tta: bool) -> int:
    """Peak bytes per decoded pixel of decoding an image and preprocessing it."""
    peak, resident = DECODE_BYTES_PER_PIXEL.get((fmt, mode), DECODE_BYTES_PER_PIXEL.get(mode, WORST_BYTES_PER_PIXEL))
    return max(peak, resident + PREPROCESS_BYTES_PER_PIXEL[spec.resize_kernel, tta])


def decode_cost(headers: list[tuple[str, str, int, int]], spec: PreprocessSpec, views: list[TTAView]) -> int:
    """Peak bytes of decoding one request: ``headers`` are (format, mode, width, height) per image."""
    tta = views != NO_TTA
    scales = {v.resize or spec.resize_size for v in views}
    per_resized_pixel = 3 + (12 if spec.resize_kernel == "float32" else 0)
    ch, cw = spec.crop_size
    crops = 2 * len(headers) * len(views) * 3 * ch * cw   # per-image blocks + their concatenation
    peak = 0
    for fmt, mode, w, h in headers:
        resized = sum(rh * rw for rh, rw in (resized_shape(h, w, s) for s in scales))
        peak = max(peak, w * h * bytes_per_pixel(fmt, mode, spec, tta) + resized * per_resized_pixel)
    return peak + crops


class DecodeBudget:
    """Bytes of decoding memory in flight across the process, admitted first come first served.

    ``reserve(nbytes, pixels, deadline)`` is a context manager around a request's decoding.
    ``on_idle``: called (with the lock released) when nothing is in flight any more after at least
    ``idle_after`` bytes were (``server.memory.IdleTrimmer.burst_ended``)."""

    # requests this small are not used to measure the decode rate (fixed costs dominate) and never
    # refused early for it; they decode in milliseconds
    LARGE = 16 * MiB
    MARGIN = 1.5   # a request waits while its deadline leaves MARGIN x its expected decoding time

    def __init__(self, capacity: int, source: str = "--max-decode-memory", on_idle=None,
                 idle_after: int = 64 * MiB):
        if capacity < 1:
            raise ValueError(f"--max-decode-memory must be > 0 bytes, got {capacity}")
        self.capacity, self.source = capacity, source
        self.on_idle, self.idle_after = on_idle, idle_after
        self.trimmer = None          # the server.memory.IdleTrimmer behind on_idle, if any (its count is a metric)
        self.in_flight = 0           # bytes reserved now
        self.pixels_in_flight = 0    # decoded pixels of the requests holding them
        self.waiting = 0             # requests waiting for the budget now
        self.waiting_bytes = 0       # and the bytes they need (at most one more budget)
        self.waits = 0               # requests that had to wait (counter)
        self.refused_busy = 0        # 503s: the deadline would pass before the budget frees up
        self.refused_too_large = 0   # 413s: more than the whole budget
        self._high_water = 0         # most bytes in flight since the last on_idle
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()   # waiting tickets, oldest first
        self._seconds_per_byte: collections.deque = collections.deque(maxlen=8)   # recent large requests

    def describe(self) -> dict:
        return {"limit_bytes": self.capacity, "limit_from": self.source, "in_flight_bytes": self.in_flight,
                "pixels_in_flight": self.pixels_in_flight, "waiting": self.waiting, "waits": self.waits,
                "refused_busy": self.refused_busy, "refused_too_large": self.refused_too_large}

    def expected_seconds(self, nbytes: int) -> float:
        """How long decoding ``nbytes`` took lately (the slowest of the recent large requests); 0 if unknown."""
        if nbytes < self.LARGE or not self._seconds_per_byte:
            return 0.0
        return max(self._seconds_per_byte) * nbytes

    @contextmanager
    def reserve(self, nbytes: int, pixels: int, deadline: Deadline):
        self.acquire(nbytes, pixels, deadline)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.release(nbytes, pixels, time.perf_counter() - t0)

    def acquire(self, nbytes: int, pixels: int, deadline: Deadline) -> None:
        if nbytes > self.capacity:
            with self._cond:
                self.refused_too_large += 1
            raise APIError(413, f"decoding this request needs about {nbytes / MiB:,.0f} MiB, more than the whole "
                                f"decode memory budget of {self.capacity / MiB:,.0f} MiB ({self.source}): send "
                                "smaller or fewer images, or raise --max-decode-memory")
        with self._cond:
            if not self._queue and self.in_flight + nbytes <= self.capacity:
                self._take(nbytes, pixels)
                return
            if self.waiting_bytes + nbytes > self.capacity:   # a whole budget is already waiting
                self.refused_busy += 1
                raise self._busy(nbytes, 0.0, deadline)
            ticket = object()
            self._queue.append(ticket)
            self.waits += 1
            self.waiting += 1
            self.waiting_bytes += nbytes
            t0 = time.time()
            try:
                while not (self._queue[0] is ticket and self.in_flight + nbytes <= self.capacity):
                    left = deadline.at - self.MARGIN * self.expected_seconds(nbytes) - time.time()
                    if left <= 0:
                        self.refused_busy += 1
                        raise self._busy(nbytes, time.time() - t0, deadline)
                    self._cond.wait(left)
                self._queue.popleft()
                self._take(nbytes, pixels)
            finally:
                self.waiting -= 1
                self.waiting_bytes -= nbytes
                if self._queue and ticket in self._queue:   # refused: the next in line may fit now
                    self._queue.remove(ticket)
                self._cond.notify_all()

    def _take(self, nbytes: int, pixels: int) -> None:
        self.in_flight += nbytes
        self.pixels_in_flight += pixels
        self._high_water = max(self._high_water, self.in_flight)

    def release(self, nbytes: int, pixels: int, seconds: float) -> None:
        idle = False
        with self._cond:
            self.in_flight -= nbytes
            self.pixels_in_flight -= pixels
            if nbytes >= self.LARGE:
                self._seconds_per_byte.append(seconds / nbytes)
            if self.in_flight == 0 and self._high_water >= self.idle_after:
                self._high_water, idle = 0, True
            self._cond.notify_all()
        if idle and self.on_idle is not None:
            self.on_idle()

    def _busy(self, nbytes: int, waited: float, deadline: Deadline) -> APIError:
        retry = max(1.0, self.expected_seconds(nbytes))
        why = (f"it waited {waited:.1f}s and its deadline of {deadline.timeout_s:g}s (--timeout-s) would pass "
               "before it could be decoded" if waited else
               f"{self.waiting_bytes / MiB:,.0f} MiB of requests are already waiting for it")
        return APIError(503, f"the server is decoding {self.in_flight / MiB:,.0f} MiB of images, its decode memory "
                             f"budget is {self.capacity / MiB:,.0f} MiB ({self.source}) and this request "
                             f"needs {nbytes / MiB:,.0f} MiB; {why}: retry after {retry:.0f}s", retry_after=retry)
