"""Bounded cost per request: what one request may ask of the server, checked before the work is done.

Every route ends in ``InferenceService`` (fast path, Flask routes, KServe v2; embedded and Redis
mode), which applies these checks in the same order:

0. the number of images, declared or counted, at most ``--max-images`` (413), before any list of
   them is built: the JSON ``images`` list, the multipart files, a KServe input's declared shape;
1. the TTA policy text (length and type) before it is parsed;
2. a client-chosen policy's views: at most ``--max-tta-views`` per image, resizes at most
   ``--max-tta-scale`` x the bundle's resize size (a bigger one costs memory and time quadratically:
   ``multiscale:100000`` on a 500x375 photo asks for a 13-gigapixel resize);
3. model rows (images x views) at most ``--max-queue-rows``: a job bigger than the whole queue
   could never be admitted, so it is a 413, not a 503 to retry;
4. the request's pixels from the image headers, before any decoding: every image's own pixels plus
   every distinct resize its views need, summed over the request, at most ``--max-request-pixels``
   (a 40000x1 image passes ``--max-pixels`` but resizes to 2.6 gigapixels at shorter side 256);
5. the deadline: ``--timeout-s`` from the request's arrival, checked between images and before the
   job is queued (504), and carried by the job to the batcher or Redis worker.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from trainer.data.transforms import PreprocessSpec, resized_shape
from trainer.tta import TTAView

from .errors import APIError

# longer than any policy a client needs (ten-crop: 8 chars; 16 sizes of multiscale: ~70), short
# enough that parsing it costs nothing
MAX_TTA_POLICY_CHARS = 256


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = 64
    max_tta_views: int = 16
    max_tta_scale: float = 2.0
    max_request_pixels: int = 100_000_000
    max_queue_rows: int = 1024
    timeout_s: float = 10.0

    @classmethod
    def from_config(cls, cfg) -> "RequestLimits":
        return cls(cfg.max_images, cfg.max_tta_views, cfg.max_tta_scale, cfg.max_request_pixels,
                   cfg.max_queue_rows, cfg.timeout_s)


class Deadline:
    """``timeout_s`` after the request arrived (``time.time()`` when the HTTP layer first saw it)."""

    def __init__(self, timeout_s: float, arrival: float | None = None):
        self.timeout_s = timeout_s
        self.arrival = time.time() if arrival is None else arrival
        self.at = self.arrival + timeout_s

    def check(self, doing: str) -> None:
        now = time.time()
        if now > self.at:
            raise APIError(504, f"request deadline of {self.timeout_s:g}s (--timeout-s) passed while {doing} "
                                f"({now - self.arrival:.2f}s after arrival); send fewer or smaller images, or "
                                "retry when the server is less busy")


def check_image_count(n: int, limits: RequestLimits) -> None:
    """The images of a request, counted or declared (a KServe shape), before any list of them is
    built: the same limit and message on every route."""
    if n < 1:
        raise APIError(400, "no image in the request; send a file field, a raw image body, JSON "
                            "{\"images\": [base64, ...]} or a KServe input 'images' of shape [N] with N >= 1")
    if n > limits.max_images:
        raise APIError(413, f"{n:,} images in one request; the limit is {limits.max_images} (--max-images): "
                            "split the request")


def check_policy_text(policy) -> str | None:
    """The raw ``tta`` option: None or a short string (JSON and KServe bodies may hold anything)."""
    if policy is None:
        return None
    if not isinstance(policy, str):
        raise APIError(400, f"tta must be a string such as 'hflip' or 'multiscale:256,320', got "
                            f"{type(policy).__name__}")
    if len(policy) > MAX_TTA_POLICY_CHARS:
        raise APIError(422, f"tta policy is {len(policy)} characters; the limit is {MAX_TTA_POLICY_CHARS} "
                            "(at most --max-tta-views views): name a shorter policy")
    return policy


def check_views(views: list[TTAView], spec: PreprocessSpec, limits: RequestLimits) -> None:
    """A client-chosen policy's views against --max-tta-views and --max-tta-scale (422)."""
    if len(views) > limits.max_tta_views:
        raise APIError(422, f"tta policy has {len(views)} views per image; the limit is {limits.max_tta_views} "
                            "(--max-tta-views): use fewer views")
    largest = int(spec.resize_size * limits.max_tta_scale)
    too_big = [v.resize for v in views if v.resize is not None and v.resize > largest]
    if too_big:
        raise APIError(422, f"tta resize {max(too_big)} is above the limit of {largest} ({limits.max_tta_scale:g} x "
                            f"the model's resize size {spec.resize_size}, --max-tta-scale): use smaller sizes")


def check_rows(n_images: int, n_views: int, limits: RequestLimits) -> None:
    rows = n_images * n_views
    if rows > limits.max_queue_rows:
        raise APIError(413, f"{n_images} images x {n_views} TTA views = {rows} model rows; one request may queue at "
                            f"most {limits.max_queue_rows} (--max-queue-rows): send fewer images or views")


def request_pixels(sizes: list[tuple[int, int]], spec: PreprocessSpec, views: list[TTAView]) -> int:
    """Pixels decoded plus pixels resized for images of (width, height) ``sizes`` under ``views``."""
    scales = {v.resize or spec.resize_size for v in views}
    total = 0
    for w, h in sizes:
        total += w * h
        for s in scales:
            rh, rw = resized_shape(h, w, s)
            total += rh * rw
    return total


def check_request_pixels(sizes: list[tuple[int, int]], spec: PreprocessSpec, views: list[TTAView],
                         limits: RequestLimits) -> None:
    total = request_pixels(sizes, spec, views)
    if total > limits.max_request_pixels:
        decoded = sum(w * h for w, h in sizes)
        raise APIError(413, f"request needs {total:,} pixels ({decoded:,} decoded, the rest resized for "
                            f"{len(views)} TTA view(s)); the limit is {limits.max_request_pixels:,} "
                            "(--max-request-pixels): send fewer or smaller images, fewer TTA scales, or images "
                            "closer to square")
