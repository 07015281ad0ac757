"""The models a server answers for: bundle manifests (for the front) and loaded bundles (for workers).

Bundles are read with ``export.load_bundle`` (the one bundle reader); the front in Redis mode only
needs the manifest (classes, preprocessing, TTA), so it never loads weights.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from trainer.data.transforms import PreprocessSpec
from trainer.tta import TTAError, TTAView, check_views, parse_policy, views_from_data

from .batching import PredictFn
from .errors import APIError
from .layout import (BackendChoice, BackendTiming, Layout, LayoutRequest, backend_candidates, choose_backend,
                     choose_layout, device_layout, measure_backend, measure_timings, usable_cores)

log = logging.getLogger("server.layout")


class ModelLoadError(ValueError):
    pass


def _manifest(root: Path) -> dict:
    from export import read_manifest   # validates the schema; raises BundleError naming the fix

    return read_manifest(root)


def read_trusted_manifest(root, trusted_keys=(), require_signature: bool = False) -> dict:
    """The manifest, after its signature check (export.signing) when keys are given or one is required:
    the Redis front reads only manifests, and must refuse what the workers would refuse."""
    from export.manifest import read_manifest_bytes
    from export.signing import check_signature, trust_policy

    manifest, raw = read_manifest_bytes(root)
    check_signature(Path(root), raw, trust_policy(trusted_keys, require_signature))
    return manifest


def _spec_from_manifest(manifest: dict, root: Path) -> PreprocessSpec:
    from export.manifest import preprocess_spec

    if manifest.get("kind") != "ensemble":
        return preprocess_spec(manifest)
    from export.manifest import read_member

    # the Redis front reads only manifests: the same checks as load_bundle (manifest_sha256, no nesting, classes)
    members = [read_member(root, manifest, m)[::-1] for m in manifest["members"]]
    specs = [preprocess_spec(member) for member, _ in members]
    if not specs:
        raise ModelLoadError(f"{root}: ensemble bundle lists no members")
    if any(s.to_dict() != specs[0].to_dict() for s in specs[1:]):
        raise ModelLoadError(f"{root}: ensemble members use different preprocessing; the server sends one "
                             "pixel block per image, so serve members with different inputs as separate models")
    return specs[0]


@dataclass
class ServedModel:
    name: str
    version: str
    kind: str
    classes: list[str]
    spec: PreprocessSpec
    tta_default: str
    tta_views: list[TTAView]
    tta_merge: str
    max_batch: int
    manifest: dict
    path: str
    predict: PredictFn | None = field(default=None, repr=False)   # None on a Redis-mode front
    # a second session with more intra-op threads, for a batch that runs while nothing else does
    # (embedded mode with several single-thread runners: a lone request then uses every core)
    predict_solo: PredictFn | None = field(default=None, repr=False)
    # ensembles: predict returns (M, N, K) member probabilities; combine fuses the view-merged members
    combine: Callable[[list[np.ndarray]], np.ndarray] | None = field(default=None, repr=False)
    layout: Layout | None = None   # embedded mode: how the model runs (server.layout); None elsewhere
    device: str = "cpu"            # where predict runs (cpu, cuda:N); a Redis front runs nothing
    backend: str = ""              # the bundle backend predict calls ("" on a Redis front)

    def execution(self) -> dict[str, str]:
        """How the model runs, as /v2/models and /metrics report it. The loader refuses a session
        that did not get the provider asked for (export.devices), so this is what really runs."""
        if self.predict is None:
            return {}
        if self.backend.startswith("onnxruntime"):
            provider = ("TensorrtExecutionProvider" if "tensorrt" in self.backend else "CUDAExecutionProvider") \
                if self.device.startswith("cuda") else "CPUExecutionProvider"
        elif self.backend.startswith("openvino"):
            provider = "OpenVINO CPU"
        else:
            provider = f"torch {self.device}"
        return {"device": self.device, "backend": self.backend, "provider": provider}

    def views_for(self, policy: str | None) -> tuple[str, list[TTAView]]:
        """A request's TTA policy (None/'' or 'default': the bundle's) -> (name, views)."""
        if policy in (None, "", "default"):
            return self.tta_default, self.tta_views
        try:
            views = parse_policy(policy)
            check_views(views, self.spec)
        except TTAError as exc:
            raise APIError(422, f"tta: {exc}") from exc
        return policy, views

    def describe(self) -> dict:
        ch, cw = self.spec.crop_size
        d = {"name": self.name, "version": self.version, "kind": self.kind, "classes": self.classes,
             "input": {"dtype": "uint8", "shape": [-1, 3, ch, cw]}, "tta_default": self.tta_default,
             "max_batch": self.max_batch, "preprocessing": self.spec.to_dict()}
        if self.layout is not None:
            d["layout"] = self.layout.describe()
        if self.predict is not None:
            d["execution"] = self.execution()
        return d


def _concurrent_ok(bundle) -> bool:
    """onnxruntime sessions may be called from several threads at once; other backends may not."""
    return all(b.startswith("onnxruntime") for b in str(bundle.backend).split(","))


def _bundle_predict(bundle) -> tuple[PredictFn, Callable | None]:
    """The loader's raw batched call; for an ensemble, each member's (fused after TTA merging,
    in the same order as the loader's own predict). Only onnxruntime sessions are called from
    several runner threads at once; other backends get one call at a time."""
    members = getattr(bundle, "members", None)
    if not members:
        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(bundle.predict_tensor(x), dtype=np.float32)
        combine = None
    else:
        from export.loader import fuse

        def predict(x: np.ndarray) -> np.ndarray:   # (M, N, K)
            return np.stack([np.asarray(m.predict_tensor(x), dtype=np.float32) for m in members])

        def combine(per_member):
            return fuse(per_member, bundle.weights, bundle.fusion)
    if _concurrent_ok(bundle):
        return predict, combine
    lock = threading.Lock()

    def one_at_a_time(x: np.ndarray) -> np.ndarray:
        with lock:
            return predict(x)

    return one_at_a_time, combine


def _choose_backend(root: Path, trust, cores: int) -> BackendChoice | None:
    """--backend auto --precision auto on the CPU: each backend x precision the bundle allows, measured
    on every core, the choice by server.layout.choose_backend. None where there is nothing to choose
    (an ensemble, a bundle without model.onnx, no openvino): export.load_bundle's auto then decides."""
    from export.loader import bf16_verification

    manifest = read_trusted_manifest(root, *trust)
    if manifest.get("kind") != "model":
        return None
    try:
        import openvino  # noqa: F401

        from export.openvino_backend import cpu_record
        have_ov, native_bf16 = True, cpu_record().native_bf16
    except ImportError:
        have_ov, native_bf16 = False, False
    cands, excluded = backend_candidates(manifest["artifacts"], bf16_verification(manifest) is not None,
                                         native_bf16, have_ov)
    if len(cands) < 2:
        return None
    load_bundle = _trusted_loader(trust)
    shape = (3, *_spec_from_manifest(manifest, root).crop_size)
    timings = []
    for backend, precision in cands:
        bundle = load_bundle(str(root), backend=backend, threads=cores, precision=precision)
        images_per_s, batch1_ms = measure_backend(_bundle_predict(bundle)[0], shape)
        timings.append(BackendTiming(backend, precision, images_per_s, batch1_ms))
        del bundle   # one model's weights at a time
    return choose_backend(timings, excluded)


def _load_with_layout(root: Path, backend: str, req: LayoutRequest, device: str = "cpu", trust=((), False),
                      precision: str = "auto"):
    """-> (bundle for the runners, solo bundle or None, layout). With --backend auto --precision auto on
    the CPU the backend and precision are chosen first (_choose_backend). Auto: the every-core session is
    loaded first (one runner's, or the solo session's); a backend that takes concurrent calls also
    gets a single-thread session, both are timed, and the layout keeps the sessions it uses. On a
    CUDA device nothing is measured (server.layout.device_layout)."""
    choice = None
    if device == "cpu" and backend == "auto" and precision == "auto":
        choice = _choose_backend(root, trust, usable_cores())
        if choice is not None:
            backend, precision = choice.backend, choice.precision
    bundle, solo, layout = _load_sessions(root, backend, req, device, trust, precision)
    if choice is None:
        given = "from --backend/--precision" if (backend, precision) != ("auto", "auto") else \
            "export.load_bundle's auto (nothing to choose between)"
        choice = BackendChoice(bundle.backend, bundle.precision, f"{given}: {bundle.precision_reason}")
    return bundle, solo, dataclasses.replace(layout, backend=choice)


def _load_sessions(root: Path, backend: str, req: LayoutRequest, device: str, trust, precision: str):
    load_bundle = functools.partial(_trusted_loader(trust), precision=precision)

    if device != "cpu":
        layout = device_layout(req, device)
        return load_bundle(str(root), backend=backend, threads=layout.threads, device=device), None, layout
    cores = usable_cores()
    if req.needs_measurement(cores):
        pooled = load_bundle(str(root), backend=backend, threads=cores)
        if not _concurrent_ok(pooled):
            return pooled, None, choose_layout(req, cores, concurrent_ok=False, backend=pooled.backend)
        single = load_bundle(str(root), backend=backend, threads=1)
        ch, cw = _spec_from_manifest(pooled.manifest, root).crop_size
        timings = measure_timings(_bundle_predict(single)[0], _bundle_predict(pooled)[0], (3, ch, cw), cores)
        layout = choose_layout(req, cores, timings, backend=pooled.backend)
        if layout.threads != 1:
            return pooled, None, layout
        if layout.solo_threads in (0, cores):
            return single, (pooled if layout.solo_threads else None), layout
        return single, load_bundle(str(root), backend=backend, threads=layout.solo_threads), layout
    layout = choose_layout(req, cores)
    bundle = load_bundle(str(root), backend=backend, threads=layout.threads)
    if not _concurrent_ok(bundle):
        fixed = choose_layout(req, cores, concurrent_ok=False, backend=bundle.backend)
        if fixed.threads != layout.threads:
            bundle = load_bundle(str(root), backend=backend, threads=fixed.threads)
        return bundle, None, fixed
    solo = load_bundle(str(root), backend=backend, threads=layout.solo_threads) if layout.solo_threads else None
    return bundle, solo, layout


def _trusted_loader(trust):
    """export.load_bundle with the signature policy (trusted key files, require_signature) applied."""
    import functools

    from export import load_bundle

    keys, required = trust
    return functools.partial(load_bundle, trusted_keys=keys, require_signature=required)


def load_served_model(path: str | Path, backend: str = "auto", threads: int | None = None,
                      with_weights: bool = True, solo_threads: int = 0,
                      layout: LayoutRequest | None = None, device: str = "cpu", trust=((), False),
                      precision: str = "auto") -> ServedModel:
    """``layout`` (embedded mode): the tuning flags; the rest is chosen here (server.layout) and
    ``threads``/``solo_threads`` are ignored. Without it, one session with ``threads`` and, if
    solo_threads > 0 and the backend allows concurrent calls (onnxruntime), a second one with that
    many threads (``predict_solo``; a second copy of the weights). ``device``: cpu, cuda or cuda:N;
    a device this machine cannot use is refused here (a BundleError naming it), never replaced by
    the CPU. ``trust``: (trusted public key files, require_signature), as export.load_bundle takes them."""
    root = Path(path)
    predict = combine = solo = chosen = None
    if with_weights:
        from export.devices import parse_device

        device = str(parse_device(device))   # "cuda" -> "cuda:0"; a typo is a BundleError naming the choices
    if with_weights and layout is not None:
        bundle, solo_bundle, chosen = _load_with_layout(root, backend, layout, device, trust, precision)
        manifest = bundle.manifest
        predict, combine = _bundle_predict(bundle)
        solo = _bundle_predict(solo_bundle)[0] if solo_bundle is not None else None
        log.info("layout for %s: %s", manifest.get("name") or root.name, chosen.summary())
    elif with_weights:
        if device == "cpu" and backend == "auto" and precision == "auto":   # a Redis worker: the same choice
            choice = _choose_backend(root, trust, threads or usable_cores())
            if choice is not None:
                backend, precision = choice.backend, choice.precision
                log.info("backend for %s: %s %s (%s)", root.name, backend, precision, choice.reason)
        # the one bundle reader (signature, sha256, schema, members)
        load_bundle = functools.partial(_trusted_loader(trust), precision=precision)
        bundle = load_bundle(str(root), backend=backend, threads=threads, device=device)
        manifest = bundle.manifest
        predict, combine = _bundle_predict(bundle)
        if solo_threads > 0 and _concurrent_ok(bundle) and device == "cpu":
            solo, _ = _bundle_predict(load_bundle(str(root), backend=backend, threads=solo_threads))
    else:
        manifest = read_trusted_manifest(root, *trust)
    spec = _spec_from_manifest(manifest, root)
    tta = manifest.get("tta") or {}
    default = tta.get("default", "none")
    try:
        views = views_from_data(tta["views"]) if tta.get("views") else parse_policy(default)
        check_views(views, spec)
    except (TTAError, TypeError) as exc:
        raise ModelLoadError(f"{root}: bad TTA section in the manifest ({exc})") from exc
    name = manifest.get("name") or root.name
    return ServedModel(name=name, version=str(manifest.get("version", "1")), kind=manifest.get("kind", "model"),
                       classes=list(manifest["classes"]), spec=spec, tta_default=default, tta_views=views,
                       tta_merge=tta.get("merge", "mean"), max_batch=int(manifest.get("max_batch", 64)),
                       manifest=manifest, path=str(root), predict=predict, predict_solo=solo, combine=combine,
                       layout=chosen, device=device if with_weights else "cpu",
                       backend=str(bundle.backend) if with_weights else "")


class ModelSet:
    """Models by name; the first one is the default."""

    def __init__(self, models: list[ServedModel]):
        self.by_name: dict[str, ServedModel] = {}
        for m in models:
            if m.name in self.by_name:
                raise ModelLoadError(f"two bundles are both named {m.name!r} ({self.by_name[m.name].path}, {m.path}); "
                                     "re-export one with another --name")
            self.by_name[m.name] = m
        self.default = models[0].name if models else None

    def get(self, name: str | None) -> ServedModel:
        name = name or self.default
        if not isinstance(name, str):   # JSON bodies may hold anything
            raise APIError(400, f"model must be a model name (a string), got {type(name).__name__}")
        if name not in self.by_name:
            raise APIError(404, f"unknown model {name!r}; available: {', '.join(self.by_name)}")
        return self.by_name[name]

    def __iter__(self):
        return iter(self.by_name.values())
