"""The inference service behind every HTTP route: decode -> enqueue (batch, predict, unbatch) -> encode.

``InferenceService`` owns the models, the limits and a dispatcher: ``EmbeddedDispatcher`` (an
in-process batching thread per model) or ``redis_front.RedisDispatcher`` (Redis Streams workers).
"""
from __future__ import annotations

import time

import numpy as np

from trainer.tta import TTAView

from .batching import BatchResult, Job, topk
from .config import ServerConfig
from .embedded import EmbeddedBatcher
from .errors import APIError
from .front import current_request_id
from .layout import choose_layout, usable_cores
from .limits import (Deadline, RequestLimits, check_image_count, check_policy_text, check_request_pixels,
                     check_rows, check_views)
from .metrics import ServerMetrics
from .models import ModelSet, ServedModel
from .preprocess import DecodeLimits, decode_to_views, sniff


class EmbeddedDispatcher:
    def __init__(self, models: ModelSet, cfg: ServerConfig):
        layouts = {m.name: m.layout or choose_layout(cfg.layout_request(), usable_cores()) for m in models}
        self.batchers = {
            m.name: EmbeddedBatcher(m.name, m.predict, min(layouts[m.name].max_batch, m.max_batch), cfg.max_delay_ms,
                                    cfg.max_queue, combine=m.combine, runners=layouts[m.name].runners,
                                    solo=m.predict_solo, max_queue_rows=cfg.max_queue_rows)
            for m in models}
        self._execution = {m.name: m.execution() for m in models}

    def infer(self, job: Job) -> BatchResult:
        return self.batchers[job.model].infer(job)

    def arriving(self, model: str):
        """Wrap a request's decoding: the batch being gathered for the model waits for it."""
        return self.batchers[model].arriving()

    def solo_batches(self, model: str) -> int:
        return self.batchers[model].solo_batches

    def depth(self, model: str) -> int:
        return self.batchers[model].depth()

    def execution(self, model: str) -> dict[str, dict]:
        """Where and how the model runs: here, in this process (a Redis front lists its workers)."""
        return {"this process": self._execution[model]}

    def ready(self, model: str) -> tuple[bool, str]:
        ok = self.batchers[model].alive()
        return ok, "batching thread running" if ok else "batching thread stopped"

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()


class InferenceService:
    """Every route ends here. ``arrival`` (``time.time()`` when the HTTP layer first saw the request)
    starts the deadline; every request's cost is bounded by ``server.limits`` before the work."""

    def __init__(self, cfg: ServerConfig, models: ModelSet, dispatcher, metrics: ServerMetrics):
        self.cfg, self.models, self.dispatcher, self.metrics = cfg, models, dispatcher, metrics
        self.limits = DecodeLimits(cfg.max_pixels, tuple(cfg.allowed_formats), cfg.jpeg_draft)
        self.request_limits = RequestLimits.from_config(cfg)
        for m in models:
            metrics.watch_model(m.name, lambda name=m.name: dispatcher.depth(name),
                                lambda name=m.name: dispatcher.solo_batches(name))
            if not cfg.redis_url:   # embedded mode: the model runs in this process
                metrics.model_info(m.name, version=m.version, **m.execution())
        if cfg.redis_url:   # Redis front: the workers say how they run the models
            metrics.watch_workers(lambda: [(m.name, consumer, info) for m in models
                                           for consumer, info in dispatcher.execution(m.name).items()])

    def execution(self, model: ServedModel) -> dict[str, dict]:
        """Where and how a model runs: {"this process": ...} in embedded mode, else each live
        worker's (device, backend, provider)."""
        return self.dispatcher.execution(model.name)

    def run_job(self, model: ServedModel, pixels: np.ndarray, n_images: int, n_views: int,
                deadline: Deadline | None = None) -> BatchResult:
        deadline = deadline or Deadline(self.cfg.timeout_s)
        deadline.check("queueing the job")   # nobody would wait for a job queued past its deadline
        job = Job(model=model.name, pixels=pixels, n_images=n_images, n_views=n_views, merge=model.tta_merge,
                  deadline=deadline.at, enqueued=time.time(), request_id=current_request_id())
        try:
            res = self.dispatcher.infer(job)
        except Exception:
            self.metrics.count_prediction(model.name, ok=False)
            raise
        self.metrics.count_prediction(model.name, ok=True)
        self.metrics.observe_result(model.name, res.batch_rows, res.queue_s, res.infer_s, n_images)
        return res

    def views(self, model: ServedModel, tta) -> tuple[str, list[TTAView]]:
        """The request's TTA policy -> (name, views), within --max-tta-views and --max-tta-scale."""
        tta = check_policy_text(tta)
        policy, views = model.views_for(tta)
        if views is not model.tta_views:   # the bundle's own default is trusted as exported
            check_views(views, model.spec, self.request_limits)
        return policy, views

    def decode(self, model: ServedModel, images: list[tuple[str, bytes]], views: list[TTAView],
               deadline: Deadline) -> np.ndarray:
        """Encoded images -> (n_images * V, 3, H, W) uint8, after every header is checked and the
        request's rows and pixels are within their limits."""
        check_rows(len(images), len(views), self.request_limits)
        sniffed = [sniff(data, name, self.limits) for name, data in images]   # headers only
        check_request_pixels([(w, h) for _, w, h in sniffed], model.spec, views, self.request_limits)
        blocks = []
        with self.dispatcher.arriving(model.name):
            for (name, data), (fmt, _, _) in zip(images, sniffed):
                deadline.check("decoding")
                blocks.append(decode_to_views(data, name, model.spec, views, self.limits, fmt).numpy())
        return np.concatenate(blocks, axis=0)

    def classify_images(self, images: list[tuple[str, bytes]], model_name: str | None = None,
                        tta: str | None = None, k: int = 5, arrival: float | None = None) -> dict:
        """Encoded images -> the /predict response body."""
        deadline = Deadline(self.cfg.timeout_s, arrival)
        t0 = time.perf_counter()
        model = self.models.get(model_name)
        check_image_count(len(images), self.request_limits)
        k = check_topk(k, len(model.classes))
        policy, views = self.views(model, tta)
        pixels = self.decode(model, images, views, deadline)   # (n_images * V, 3, H, W) uint8
        t1 = time.perf_counter()
        res = self.run_job(model, pixels, len(images), len(views), deadline)
        preds = topk(res.probs, model.classes, k)
        for (name, _), p in zip(images, preds):
            p["file"] = name
        return {"model": model.name, "version": model.version, "tta": policy, "predictions": preds,
                "batch_size": res.batch_rows,
                "timings_ms": {"decode": round((t1 - t0) * 1e3, 3), "queue": round(res.queue_s * 1e3, 3),
                               "inference": round(res.infer_s * 1e3, 3),
                               "total": round((time.perf_counter() - t0) * 1e3, 3)}}

    def probs_for_tensor(self, model: ServedModel, x: np.ndarray, arrival: float | None = None) -> np.ndarray:
        """(N, 3, H, W) uint8 already preprocessed -> (N, K) probabilities (no TTA: views need the image)."""
        ch, cw = model.spec.crop_size
        if x.ndim != 4 or x.shape[1:] != (3, ch, cw):
            raise APIError(400, f"input tensor has shape {list(x.shape)}; model {model.name!r} takes "
                                f"[N, 3, {ch}, {cw}] uint8 (resized and cropped as its manifest says)")
        check_image_count(x.shape[0], self.request_limits)
        check_rows(x.shape[0], 1, self.request_limits)
        return self.run_job(model, np.ascontiguousarray(x, dtype=np.uint8), x.shape[0], 1,
                            Deadline(self.cfg.timeout_s, arrival)).probs

    def probs_for_images(self, model: ServedModel, images: list[tuple[str, bytes]], tta: str | None = None,
                         arrival: float | None = None) -> np.ndarray:
        deadline = Deadline(self.cfg.timeout_s, arrival)
        check_image_count(len(images), self.request_limits)
        _, views = self.views(model, tta)
        pixels = self.decode(model, images, views, deadline)
        return self.run_job(model, pixels, len(images), len(views), deadline).probs


def check_topk(k, n_classes: int) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError, OverflowError):   # JSON bodies may hold lists, Infinity, NaN
        raise APIError(400, f"topk must be an integer, got {k!r}") from None
    if k < 1:
        raise APIError(400, f"topk must be >= 1, got {k}")
    return min(k, n_classes)
