"""Load a bundle (or an ensemble bundle) and classify images with it.

    from export import load_bundle
    bundle = load_bundle("bundles/digits", backend="onnxruntime", threads=2)
    result = bundle.predict(["a.png", open("b.jpg", "rb").read()], tta="hflip", topk=3)
    result.labels        # [['7', '1', '0'], ...]   result.probs: (N, K) float32
    bundle.predict_tensor(uint8_nchw)                # raw model call: no preprocessing, no TTA

Backends: ``onnxruntime`` (model.onnx), ``onnxruntime-int8`` (model.int8.onnx), ``torchscript``
(model.ts), ``pt2`` (model.pt2), ``eager`` (rebuilds the model from the source checkpoint that the
manifest records; only where that file still exists with the recorded sha256: a bundle copied to
another machine has no eager backend) and ``auto`` (the first of onnxruntime, pt2, torchscript the
bundle has), ``openvino`` (model.onnx on OpenVINO's CPU plugin) and ``openvino-int8``
(model.int8.onnx on it), ``native`` (the C++ runtime: export.loader knows its factory by name,
``classify_native.backend:native_backend``, and imports it only when asked; the plugin does not
register itself, so neither package imports the other at import time). ``register_backend`` adds
more. Every backend reads the artifact once, checks the sha256 of those bytes and loads from them
(never from the path again: manifest.read_artifact).

``precision``: ``fp32``, ``bf16`` (backend ``openvino`` only, on a CPU with native bf16) or ``auto``
(the default): bf16 only where the backend runs it, the CPU has native bf16 AND the manifest records
that bf16 was verified at export (``python -m export ... --verify-precision bf16``); fp32 otherwise.
``bundle.precision`` and ``bundle.precision_reason`` say what was chosen and why.

``threads``: the model's own intra-op threads. onnxruntime and OpenVINO take them per session;
TorchScript, ``.pt2`` and eager have only torch's process-wide setting, so they set it for the
duration of each call and restore it afterwards (a load never changes it).

Signatures (export.signing, docs/BUNDLE.md "Trust"): ``load_bundle(path, trusted_keys=["pub.pem"],
require_signature=True)`` refuses a bundle whose signature.json is missing, made by another key, or
does not match the manifest bytes that are then used.

``device="cuda[:N]"``: ``torchscript`` and ``pt2`` load the artifacts compiled for CUDA (manifest
``device: "cuda"``; ``pt2-fp16``, ``torchscript-bf16``, ... the reduced-precision variants),
``onnxruntime`` runs model.onnx on the CUDA execution provider (``onnxruntime-tensorrt``: TensorRT
first, opt-in), ``auto`` takes the first of pt2, torchscript (CUDA artifacts) and onnxruntime. A
bundle without CUDA artifacts says what to re-export.
"""
from __future__ import annotations

import contextvars
import hashlib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trainer.data import decode_image
from trainer.tta import TTAView, apply_views, check_views, merge_probs, parse_policy, views_from_data

from .devices import Device, parse_device, require_cuda
from .formats import Runtime, open_runtime, torch_threads
from .manifest import (BundleError, artifact_key, file_sha256, manifest_path, preprocess_spec, read_artifact,
                       read_manifest_bytes, read_member)
from .portable import pt2_problem, pt2_refusal
from .signing import check_signature, trust_policy

log = logging.getLogger("export.loader")

BackendFactory = Callable[[Path, dict, "int | None", str], Runtime]  # (folder, manifest, threads, device)
_BACKENDS: dict[str, BackendFactory] = {}
# backends that take precision= (besides fp32): name -> the precisions they run
_PRECISIONS: dict[str, tuple[str, ...]] = {}
# backends living in other packages, found by name and imported only when asked for (no import circle:
# the plugin may import export.loader, export.loader never imports the plugin at import time)
PLUGINS = {"native": "classify_native.backend:native_backend"}
PRECISION_CHOICES = ("auto", "fp32", "bf16")
# sha256 of the manifest.json bytes being loaded (the ones whose signature and hashes were checked), set
# while a backend factory runs: a backend that reads the bundle again itself (the native one) compares.
_MANIFEST_SHA256: contextvars.ContextVar[str] = contextvars.ContextVar("manifest_sha256", default="")


def loading_manifest_sha256() -> str:
    """Inside a BackendFactory: the sha256 of the manifest bytes the loader checked ("" outside one)."""
    return _MANIFEST_SHA256.get()


AUTO_ORDER = ("onnxruntime", "pt2", "torchscript")
AUTO_ORDER_CUDA = ("pt2", "torchscript", "onnxruntime")  # compiled for the GPU first, ONNX on the CUDA EP last
_BACKEND_ARTIFACT = {"onnxruntime": "onnx", "onnxruntime-int8": "onnx_int8", "torchscript": "torchscript",
                     "pt2": "pt2"}


def register_backend(name: str, factory: BackendFactory, replace: bool = False,
                     precisions: tuple[str, ...] = ("fp32",)) -> None:
    """Add a backend: ``factory(bundle_folder, manifest, threads, device)`` returns a callable that maps a
    (N, 3, H, W) uint8 tensor (N <= max_batch) to (N, K) float32 probabilities (tensor or array).
    ``precisions`` other than fp32 only: the factory is called with ``precision=`` too."""
    if name in _BACKENDS and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    _BACKENDS[name] = factory
    if tuple(precisions) != ("fp32",):
        _PRECISIONS[name] = tuple(precisions)
    else:
        _PRECISIONS.pop(name, None)


def list_backends() -> list[str]:
    return ["auto", *sorted(set(_BACKENDS) | set(PLUGINS))]


def backend_precisions(name: str) -> tuple[str, ...]:
    """The precisions backend ``name`` runs (fp32 for every backend; bf16 for openvino)."""
    return _PRECISIONS.get(name, ("fp32",))


def _factory(name: str) -> BackendFactory:
    """The registered factory, or a plugin's, imported now ('module:function' in PLUGINS)."""
    if name in _BACKENDS:
        return _BACKENDS[name]
    module, func = PLUGINS[name].split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as exc:
        raise BundleError(f"backend 'native' needs the compiled runtime ({exc}); build it with "
                          "'bash scripts/setup.sh' or 'cmake -S . -B build && cmake --build build'") from None


def compiled_artifact(manifest: dict, family: str, device: Device, precision: str = "fp32", folder="") -> str:
    """Manifest key of the TorchScript/.pt2 artifact compiled for ``device`` in ``precision``, or a
    BundleError saying what to re-export."""
    key = artifact_key(family, device.kind, precision)
    if not device.is_cuda and precision != "fp32":
        raise BundleError(f"backend '{family}-{precision}' runs the {precision} CUDA artifacts; use device='cuda' "
                          f"(or backend '{family}' on the CPU)")
    if device.is_cuda and key not in manifest["artifacts"]:
        have = ", ".join(manifest["artifacts"]) or "none"
        prec = "" if precision == "fp32" else f" --precision {precision}"
        raise BundleError(f"{folder}: the bundle has no {family} artifact compiled for CUDA in {precision} (it has: "
                          f"{have}); re-export it on a GPU machine with 'python -m export --checkpoint CKPT --out DIR "
                          f"--device cuda{prec}', or use backend 'onnxruntime' (model.onnx on the CUDA execution "
                          "provider)")
    return key


def _check_compiled_for(folder: Path, art: dict, device: Device) -> None:
    """A CUDA .pt2 holds kernels for the GPU architecture it was compiled on and fails elsewhere."""
    want = (art.get("compiled_for") or {}).get("capability")
    if art["format"] != "aotinductor" or not device.is_cuda or not want:
        return
    got = "{}.{}".format(*torch.cuda.get_device_capability(device.index))
    if got != want:
        raise BundleError(f"{folder}/{art['file']}: compiled for a GPU of compute capability {want} "
                          f"({art['compiled_for'].get('gpu')}), this {device} is {got}; re-export on this GPU "
                          "('python -m export ... --device cuda') or use backend 'torchscript' or 'onnxruntime'")


def _artifact_factory(key: str, precision: str = "fp32") -> BackendFactory:
    def factory(folder: Path, manifest: dict, threads, device) -> Runtime:
        dev = parse_device(device)
        name = compiled_artifact(manifest, key, dev, precision, folder) if key in ("pt2", "torchscript") else key
        if name in manifest["artifacts"]:
            reason = pt2_problem(manifest["artifacts"][name], str(folder))
            if reason:  # before opening it: loading a package built for a newer CPU kills the process
                raise BundleError(pt2_refusal(reason, folder))
        verified = read_artifact(folder, manifest, name)   # refuses an absent or changed artifact first
        art = verified.entry
        _check_compiled_for(folder, art, dev)
        return open_runtime(verified, art["format"], threads, str(dev), art.get("static_batch_models"))

    return factory


def _eager_factory(folder: Path, manifest: dict, threads, device) -> Runtime:
    from trainer.inference import model_from_checkpoint

    from .graph import probability_model

    prov = manifest["provenance"]
    ckpt = prov.get("checkpoint")
    if not ckpt or not Path(ckpt).is_file():
        raise BundleError(f"{folder}: backend 'eager' needs the source checkpoint {ckpt!r}, which is not on this "
                          "machine; use backend 'onnxruntime', 'pt2' or 'torchscript'")
    if file_sha256(ckpt) != prov.get("checkpoint_sha256"):
        raise BundleError(f"{ckpt}: changed since the bundle was exported (sha256 differs); re-export the bundle "
                          "or use an artifact backend")
    loaded = model_from_checkpoint(ckpt, prov.get("weights", "auto"))
    net = probability_model(loaded.model, preprocess_spec(manifest)).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch_threads(threads), torch.inference_mode():
            return net(x.to(device)).cpu()

    return run


for _name, _key in _BACKEND_ARTIFACT.items():
    register_backend(_name, _artifact_factory(_key))
for _key in ("pt2", "torchscript"):
    for _prec in ("fp16", "bf16"):
        register_backend(f"{_key}-{_prec}", _artifact_factory(_key, _prec))


def _tensorrt_factory(folder: Path, manifest: dict, threads, device) -> Runtime:
    """model.onnx on onnxruntime's TensorRT provider (CUDA for what TensorRT lacks); opt-in: engines are
    built on first use, which takes a while."""
    dev = parse_device(device)
    if not dev.is_cuda:
        raise BundleError("backend 'onnxruntime-tensorrt' needs device='cuda[:N]'")
    return open_runtime(read_artifact(folder, manifest, "onnx"), "onnx", threads, str(dev), tensorrt=True)


register_backend("onnxruntime-tensorrt", _tensorrt_factory)
register_backend("eager", _eager_factory)


def _openvino_factory(key: str) -> BackendFactory:
    def factory(folder: Path, manifest: dict, threads, device, precision: str = "fp32") -> Runtime:
        from .openvino_backend import open_openvino

        if parse_device(device).is_cuda:
            raise BundleError(f"backend 'openvino' runs on the CPU (its CPU plugin); use device='cpu', or backend "
                              f"'onnxruntime' for {device}")
        return open_openvino(read_artifact(folder, manifest, key), threads, precision)

    return factory


register_backend("openvino", _openvino_factory("onnx"), precisions=("fp32", "bf16"))
register_backend("openvino-int8", _openvino_factory("onnx_int8"))


def bf16_verification(manifest: dict) -> dict | None:
    """The manifest's record that bf16 kept top-1 within the gate at export (model.onnx), or None."""
    return ((manifest.get("artifacts", {}).get("onnx") or {}).get("precision_checks") or {}).get("bf16")


def resolve_precision(manifest: dict, backend: str, precision: str, cpu=None, folder="") -> tuple[str, str]:
    """-> (precision, reason). ``auto``: bf16 only where ``backend`` runs it, ``cpu`` (an
    openvino_backend.CpuRecord; this machine's by default) has native bf16 and the manifest records
    bf16 verified at export; else fp32. ``bf16`` asked for explicitly is refused where the backend or
    the CPU cannot run it, and warned about (not refused) on a bundle never verified."""
    if precision not in PRECISION_CHOICES:
        raise BundleError(f"unknown precision {precision!r}; use one of {', '.join(PRECISION_CHOICES)}")
    if precision == "fp32":
        return "fp32", "fp32 asked for"
    runs_bf16 = "bf16" in backend_precisions(backend)
    if precision == "bf16" and not runs_bf16:
        raise BundleError(f"precision bf16: backend {backend!r} runs fp32 only; use backend 'openvino' "
                          "(model.onnx in bf16 on a CPU with native bf16) or precision fp32/auto")
    if not runs_bf16:
        return "fp32", f"backend {backend} runs fp32 only"
    if cpu is None:
        from .openvino_backend import cpu_record

        cpu = cpu_record()
    check = bf16_verification(manifest)
    if precision == "bf16":
        if not cpu.native_bf16:
            raise BundleError(f"precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX), and this one has "
                              f"none ({cpu.describe()}): OpenVINO would run fp32 under a bf16 label. Use "
                              "precision fp32 (or auto, which picks bf16 only where it is native)")
        if check is None:
            log.warning("%s: bf16 asked for, but the bundle records no bf16 verification; its top-1 in bf16 is "
                        "unchecked (export with --verify-precision bf16 --data DIR to check it)", folder or "bundle")
            return "bf16", "bf16 asked for (not verified at export)"
        return "bf16", "bf16 asked for"
    if check is None:
        return "fp32", ("the bundle records no bf16 verification (export with --verify-precision bf16 --data DIR): "
                        "fp32")
    if not cpu.native_bf16:
        return "fp32", f"{cpu.describe()}: fp32"
    return "bf16", (f"bf16 verified at export (top-1 {check.get('top1_drop', 0):g} points from fp32 on "
                    f"{check.get('validation_images')} images, gate {check.get('max_accuracy_drop')}) and native on "
                    "this CPU")


@dataclass
class Prediction:
    probs: np.ndarray  # (N, K) float32
    indices: np.ndarray  # (N, k) int64, best first (ties: lowest class index first)
    scores: np.ndarray  # (N, k) float32, the probabilities of ``indices``
    classes: list[str]

    @property
    def labels(self) -> list[list[str]]:
        return [[self.classes[i] for i in row] for row in self.indices]

    @property
    def top1(self) -> list[str]:
        return [row[0] for row in self.labels]


def make_prediction(probs: np.ndarray, classes: list[str], topk: int) -> Prediction:
    k = max(1, min(topk, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return Prediction(probs, order, np.take_along_axis(probs, order, 1), classes)


def _as_list(images) -> list:
    if isinstance(images, (str, os.PathLike, bytes, bytearray)):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return [images]
    return list(images)


def decode_all(images) -> list[np.ndarray]:
    out = []
    for img in _as_list(images):
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise BundleError(f"decoded images must be (H, W, 3) uint8 RGB arrays, got {img.dtype} {img.shape}",
                                  "input")
            out.append(img)
        else:
            out.append(decode_image(img))
    return out


def _resolve_views(tta, default: list[TTAView]) -> list[TTAView]:
    if tta is None:
        return default
    if isinstance(tta, str):
        return parse_policy(tta)
    return [v if isinstance(v, TTAView) else TTAView(**v) for v in tta]


class ModelBundle:
    def __init__(self, folder: Path, manifest: dict, run: Runtime, backend: str, tta=None):
        self.path, self.manifest, self.backend, self._run = folder, manifest, backend, run
        self.precision, self.precision_reason = "fp32", ""   # set by the loader (resolve_precision)
        self.classes: list[str] = list(manifest["classes"])
        self.spec = preprocess_spec(manifest)
        self.max_batch: int = manifest["max_batch"]
        self.merge: str = manifest["tta"]["merge"]
        self.views = _resolve_views(tta, views_from_data(manifest["tta"]["views"]))
        check_views(self.views, self.spec)
        self.input_shape = tuple(manifest["input"]["shape"][1:])

    def predict_tensor(self, batch) -> np.ndarray:
        """(N, 3, H, W) uint8 tensor or array -> (N, K) float32 probabilities; no preprocessing, no TTA."""
        x = torch.as_tensor(batch)
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise BundleError(f"{self.path}: expected a (N, {', '.join(map(str, self.input_shape))}) uint8 batch, "
                              f"got {x.dtype} {tuple(x.shape)}", "input")
        outs = [np.asarray(self._run(x[i:i + self.max_batch]), dtype=np.float32)
                for i in range(0, x.shape[0], self.max_batch)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.classes)), np.float32)

    def probs_decoded(self, decoded: list[np.ndarray], views: list[TTAView], merge: str | None = None) -> np.ndarray:
        """(N, K) probabilities of decoded images, their views merged by ``merge`` (default: this bundle's)."""
        check_views(views, self.spec)
        crops = torch.stack([apply_views(img, self.spec, views) for img in decoded])  # (N, V, 3, h, w)
        n, v = crops.shape[:2]
        probs = torch.from_numpy(self.predict_tensor(crops.flatten(0, 1))).view(n, v, -1)
        return merge_probs(probs.transpose(0, 1), merge or self.merge).numpy()

    def predict(self, images, tta=None, topk: int = 5) -> Prediction:
        """File paths, encoded bytes or decoded (H, W, 3) uint8 arrays -> Prediction (probs + top-k)."""
        decoded = decode_all(images)
        if not decoded:
            return make_prediction(np.zeros((0, len(self.classes)), np.float32), self.classes, topk)
        return make_prediction(self.probs_decoded(decoded, _resolve_views(tta, self.views)), self.classes, topk)


def fuse(probs: list[np.ndarray], weights: Sequence[float], fusion: str) -> np.ndarray:
    """Member probabilities (each (N, K)) -> (N, K): mean, weighted mean or weighted top-1 vote fractions."""
    stack = np.stack(probs)  # (M, N, K)
    w = np.asarray(weights, dtype=np.float64)
    if fusion == "mean":
        w = np.ones_like(w)
    w = w / w.sum()
    if fusion == "vote":
        stack = np.eye(stack.shape[-1], dtype=np.float64)[stack.argmax(-1)]  # (M, N, K) one-hot top-1
    return np.tensordot(w, stack, axes=1).astype(np.float32)


class EnsembleBundle:
    def __init__(self, folder: Path, manifest: dict, members: list[ModelBundle], tta=None):
        self.path, self.manifest, self.members = folder, manifest, members
        self.classes: list[str] = list(manifest["classes"])
        self.fusion: str = manifest["fusion"]
        self.weights = [float(m["weight"]) for m in manifest["members"]]
        # The ensemble's tta.merge merges every member's views (docs/BUNDLE.md "Ensembles"), as in C++.
        self.merge: str = manifest["tta"]["merge"]
        self.views = _resolve_views(tta, views_from_data(manifest["tta"]["views"]))
        self.backend = ",".join(sorted({m.backend for m in members}))
        self.precision = ",".join(sorted({m.precision for m in members}))
        self.precision_reason = "; ".join(dict.fromkeys(m.precision_reason for m in members))
        self.max_batch = min(m.max_batch for m in members)

    def predict_tensor(self, batch) -> np.ndarray:
        shapes = {m.input_shape for m in self.members}
        if len(shapes) > 1:
            raise BundleError(f"{self.path}: members take different input sizes {sorted(shapes)}; use predict(), "
                              "which preprocesses for each member")
        return fuse([m.predict_tensor(batch) for m in self.members], self.weights, self.fusion)

    def predict(self, images, tta=None, topk: int = 5) -> Prediction:
        decoded = decode_all(images)
        if not decoded:
            return make_prediction(np.zeros((0, len(self.classes)), np.float32), self.classes, topk)
        views = _resolve_views(tta, self.views)
        probs = fuse([m.probs_decoded(decoded, views, self.merge) for m in self.members], self.weights, self.fusion)
        return make_prediction(probs, self.classes, topk)


def _pick_backend(manifest: dict, backend: str, folder: Path, device: Device) -> str:
    if backend != "auto":
        if backend not in _BACKENDS and backend not in PLUGINS:
            raise BundleError(f"unknown backend {backend!r}; use one of {', '.join(list_backends())}")
        return backend
    if device.is_cuda:
        for name in AUTO_ORDER_CUDA:
            key = _BACKEND_ARTIFACT[name]
            if (artifact_key(key, "cuda") if key in ("pt2", "torchscript") else key) in manifest["artifacts"]:
                return name
        raise BundleError(f"{folder}: no artifact that runs on CUDA (it has: {', '.join(manifest['artifacts'])}); "
                          "re-export it on a GPU machine with 'python -m export --checkpoint CKPT --out DIR --device "
                          "cuda' (or with --format onnx, which runs on the CUDA execution provider)")
    for name in AUTO_ORDER:
        art = manifest["artifacts"].get(_BACKEND_ARTIFACT[name])
        if art is None:
            continue
        reason = pt2_problem(art, str(folder))
        if reason:
            log.warning("skipping the .pt2: %s; falling back to the next artifact", pt2_refusal(reason, folder))
            continue
        return name
    raise BundleError(f"{folder}: no artifact that backend 'auto' can run; pass backend= explicitly")


def load_bundle(path: str | os.PathLike, backend: str = "auto", tta=None, threads: int | None = None,
                device: str = "cpu", trusted_keys=(), require_signature: bool = False,
                precision: str = "auto") -> ModelBundle | EnsembleBundle:
    """Open a bundle folder (model or ensemble) with one backend; ``tta`` overrides the manifest's default.

    device: cpu, cuda or cuda:N (refused at once where that device does not exist).
    precision: auto, fp32 or bf16 (module docstring; resolve_precision).
    trusted_keys: Ed25519 public key files (PEM, from 'python -m export keygen') or loaded keys; a
    signature.json that is present is then checked. require_signature: refuse unsigned bundles too."""
    dev = parse_device(device)
    require_cuda(dev, "device")
    policy = trust_policy(trusted_keys, require_signature)
    folder = manifest_path(path).parent
    manifest, raw = read_manifest_bytes(folder)
    check_signature(folder, raw, policy)
    if precision not in PRECISION_CHOICES:
        raise BundleError(f"unknown precision {precision!r}; use one of {', '.join(PRECISION_CHOICES)}")
    return _load(folder, manifest, hashlib.sha256(raw).hexdigest(), backend, tta, threads, dev, precision)


def _load(folder: Path, manifest: dict, manifest_sha256: str, backend: str, tta, threads,
          dev: Device, precision: str = "auto") -> ModelBundle | EnsembleBundle:
    """``manifest_sha256``: of the bytes the manifest was parsed from (the native backend's C++ reader refuses
    a manifest changed since); members are pinned by the ensemble's manifest_sha256, which a signature covers."""
    if manifest["kind"] == "model":
        name = _pick_backend(manifest, backend, folder, dev)
        prec, why = resolve_precision(manifest, name, precision, folder=folder)
        extra = {"precision": prec} if name in _PRECISIONS else {}
        token = _MANIFEST_SHA256.set(manifest_sha256)
        try:
            run = _factory(name)(folder, manifest, threads, str(dev), **extra)
        finally:
            _MANIFEST_SHA256.reset(token)
        check_output_width(run, manifest, folder, name)
        bundle = ModelBundle(folder, manifest, run, name, tta)
        bundle.precision, bundle.precision_reason = prec, why
        return bundle
    members = []
    for mem in manifest["members"]:
        sub, sub_manifest = read_member(folder, manifest, mem)  # pinned by manifest_sha256, a model, same classes
        members.append(_load(sub, sub_manifest, mem["manifest_sha256"], backend, tta, threads, dev, precision))
    return EnsembleBundle(folder, manifest, members, tta)


def check_output_width(run: Runtime, manifest: dict, folder: Path, backend: str) -> None:
    """One warm-up call at load time, as the C++ runtime makes: a model whose output width is not the
    manifest's class count (a class list edited together with output.shape) is refused here, not at
    the first image."""
    h, w = manifest["input"]["shape"][2:]
    out = np.asarray(run(torch.zeros((1, 3, h, w), dtype=torch.uint8)))
    k = len(manifest["classes"])
    if out.shape != (1, k):
        raise BundleError(f"{folder}: the manifest lists {k} classes but backend {backend!r} outputs "
                          f"{out.shape[-1] if out.ndim == 2 else 'shape ' + str(out.shape)} scores per image; the "
                          "class list must match the model's output: re-export the bundle", "classes")
