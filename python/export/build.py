"""Build a verified model bundle from a training checkpoint.

    python -m export --checkpoint runs/digits/best.pt --format all --out bundles/digits --data data/digits

Library form: ``build_bundle(ExportOptions(checkpoint=..., out=..., formats=["onnx"]))``. Every
artifact is loaded back in its own runtime and compared with eager PyTorch before it counts; the
bundle is assembled in a temporary folder next to ``out`` and renamed into place only when every
check passed, so a failure never leaves a half-written bundle.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.inference import model_from_checkpoint
from trainer.engine.checkpoint import file_sha256 as checkpoint_sha256
from trainer.tta import MERGES, check_views, parse_policy

from . import formats as fmt
from .graph import example_batch, probability_model
from .devices import check_available_providers, parse_device, require_cuda
from .manifest import (ARTIFACT_FILES, INPUT_NAME, OUTPUT_NAME, PRECISIONS, SCHEMA_VERSION, BundleError, file_sha256,
                       preprocessing_dict, utc_now, utc_version, write_manifest)
from .onnx_metadata import embed_onnx_metadata
from .quantize import CALIBRATION_METHODS
from .portable import compiled_for, resolve_isa
from .precision import check_precision_options
from .samples import calibration_images, validation_images
from .verify import check_parity

FORMATS = ("torchscript", "onnx", "pt2")


@dataclass
class ExportOptions:
    checkpoint: str
    out: str
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    opset: int = 18
    max_batch: int = 64
    weights: str = "auto"  # auto | model | ema
    verify: bool = True
    quantize: str | None = None  # None | "int8"
    calibration: str | None = None
    calibration_count: int = 256
    calibration_method: str = "minmax"  # minmax | entropy | percentile (onnxruntime CalibrationMethod)
    max_accuracy_drop: float = 1.0  # int8 top-1 may lose at most this many percentage points against fp32
    data: str | None = None
    validation_limit: int = 2000
    name: str | None = None
    tta: str = "none"
    tta_merge: str = "mean"
    tolerance: float = 1e-4
    force: bool = False
    # .pt2 only: batch sizes that also get a model compiled for exactly that size (prepacked weights)
    pt2_static_batches: list[int] = field(default_factory=lambda: [1])
    # .pt2 only: the x86-64 level the package is compiled for (export.portable: auto, native, default, avx2,
    # avx512); resolved by _check_options ("auto" -> avx2 where this CPU has it)
    pt2_isa: str = "auto"
    pt2_program: bool = True  # ship the ExportedProgram (model.program.pt2, one more copy of the weights)
    # cuda[:N]: also write TorchScript and .pt2 compiled for that GPU, in each of ``precisions``
    device: str = "cpu"
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    cuda_tolerance: float = 1e-3  # fp32 CUDA artifacts vs eager fp32 on the GPU (cuda_export.py says why)
    half_tolerance: float | None = None  # None: fp16 1e-2, bf16 5e-2
    # reduced precisions of model.onnx to measure against fp32 at export (export.precision): "bf16"
    verify_precisions: list[str] = field(default_factory=list)


def resolve_formats(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for f in (FORMATS if n == "all" else [n]):
            if f not in FORMATS:
                raise BundleError(f"unknown format {f!r}; use one of {', '.join(FORMATS)} or all")
            if f not in out:
                out.append(f)
    return out


def _check_device(o: ExportOptions) -> None:
    """Refuse a CUDA export that cannot run here before any work (loading, tracing) starts."""
    dev = parse_device(o.device)
    bad = [p for p in o.precisions if p not in PRECISIONS]
    if bad or not o.precisions:
        raise BundleError(f"--precision {bad or '(none)'}: use one or more of {', '.join(PRECISIONS)}")
    if not dev.is_cuda and o.precisions != ["fp32"]:
        raise BundleError(f"--precision {' '.join(o.precisions)}: fp16/bf16 variants are CUDA artifacts; add "
                          "--device cuda (on a GPU machine) or drop --precision")
    require_cuda(dev, "--device")
    if dev.is_cuda and "onnx" in o.formats:
        try:
            check_available_providers(dev)
        except BundleError as exc:
            raise BundleError(f"{exc}; or export --format torchscript pt2 to skip the ONNX check on CUDA") from None


def _check_options(o: ExportOptions) -> None:
    o.formats = resolve_formats(o.formats)
    _check_device(o)
    if o.quantize not in (None, "int8"):
        raise BundleError(f"unknown quantization {o.quantize!r}; only int8 is supported")
    if o.quantize and not o.calibration:
        raise BundleError("--quantize int8 needs --calibration DIR (a folder of representative images, e.g. the "
                          "training split)")
    if o.quantize and o.calibration_method not in CALIBRATION_METHODS:
        raise BundleError(f"unknown --calibration-method {o.calibration_method!r}; use one of "
                          f"{', '.join(CALIBRATION_METHODS)}")
    if o.quantize and not math.isfinite(o.max_accuracy_drop):
        raise BundleError(f"--max-accuracy-drop must be a number of percentage points, got {o.max_accuracy_drop}")
    if o.quantize and "onnx" not in o.formats:
        o.formats.append("onnx")  # the int8 model is quantized from the fp32 ONNX
    check_precision_options(o.verify_precisions)
    if o.verify_precisions and not math.isfinite(o.max_accuracy_drop):
        raise BundleError(f"--max-accuracy-drop must be a number of percentage points, got {o.max_accuracy_drop}")
    if o.verify_precisions and not o.verify:
        raise BundleError("--verify-precision measures against the verified fp32 artifacts; drop --no-verify")
    if o.verify_precisions and "onnx" not in o.formats:
        o.formats.append("onnx")  # bf16 runs model.onnx (OpenVINO)
    bad = [n for n in o.pt2_static_batches if not 1 <= n <= o.max_batch]
    if bad:
        raise BundleError(f"--pt2-static-batches {bad}: each size must be between 1 and --max-batch {o.max_batch}")
    if "pt2" in o.formats:
        o.pt2_isa = resolve_isa(o.pt2_isa)
    if o.max_batch < 2:
        raise BundleError(f"--max-batch must be at least 2 (the batch dimension is dynamic), got {o.max_batch}")
    if o.tta_merge not in MERGES:
        raise BundleError(f"unknown TTA merge {o.tta_merge!r}; use one of {MERGES}")
    out = Path(o.out)
    if out.exists() and not o.force:
        raise BundleError(f"'{out}' already exists; choose another --out or pass --force to replace it")
    if out.exists() and not (out / "manifest.json").is_file():
        raise BundleError(f"'{out}' exists and is not a bundle; refusing to replace it (choose another --out)")


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _default_name(ckpt: dict) -> str:
    data = (ckpt.get("config") or {}).get("data")
    stem = Path(str(data)).name if data else Path(ckpt["path"]).parent.name
    arch = ckpt["arch"].replace("/", "-")  # "timm/<name>": bundle names end up in file names and URLs
    return f"{stem}-{arch}" if stem else arch


@contextmanager
def staged_bundle(out: Path):
    """Yield a private folder next to ``out`` to write a bundle into; leaving the block without an
    error moves it into place (``_install``), an error removes it, so a half-written bundle never
    appears at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an older bundle at ``out`` is removed only afterwards."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; a bundle is readable like any folder
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_bundle(opts: ExportOptions, say=print) -> tuple[Path, dict]:
    _check_options(opts)
    loaded = model_from_checkpoint(opts.checkpoint, opts.weights)
    ckpt, spec, classes = loaded.checkpoint, loaded.preprocess, loaded.classes
    views = parse_policy(opts.tta)
    check_views(views, spec)
    net = probability_model(loaded.model, spec)

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x)

    half = any(p != "fp32" for p in opts.precisions)
    gated = opts.quantize or opts.verify_precisions
    need_val = opts.validation_limit if gated or half else 8  # top-1 checks want many images
    val = validation_images(spec, classes, opts.data, opts.calibration, limit=need_val)
    if opts.verify_precisions and val.labels is None:
        raise BundleError(f"--verify-precision needs labelled validation images to measure top-1, and {val.source} "
                          "has no labels; give --data DATA (a dataset with a val split, class folders or a list "
                          "file). No bundle was written.")
    if opts.quantize and val.labels is None:
        raise BundleError(f"--quantize int8 needs labelled validation images to check its top-1, and {val.source} "
                          "has no labels; give --data DATA (a dataset with a val split, class folders or a list "
                          "file) or a --calibration folder of class folders. No bundle was written.")
    example = example_batch(spec, 2)  # N >= 2 so the batch dimension is not specialised to 1
    h, w = spec.crop_size
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "model", "name": opts.name or _default_name(ckpt),
        "version": utc_version(), "architecture": ckpt["arch"], "classes": classes,
        "preprocessing": preprocessing_dict(spec),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [-1, 3, h, w]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, len(classes)], "kind": "probabilities"},
        "max_batch": opts.max_batch,
        "tta": {"default": opts.tta, "merge": opts.tta_merge, "views": [v.to_dict() for v in views]},
        "artifacts": {},
        "provenance": {**_versions(), "checkpoint": str(Path(ckpt["path"]).resolve()),
                       "checkpoint_sha256": checkpoint_sha256(ckpt["path"]), "weights": loaded.weights,
                       "created": utc_now(), "verified_on": val.source if opts.verify else None,
                       "export_options": asdict(opts)},
        "metrics": {"val_top1": ckpt.get("best_metric"), "best_epoch": ckpt.get("best_epoch")},
    }
    out = Path(opts.out).resolve()
    program = None
    cuda = parse_device(opts.device).is_cuda
    with staged_bundle(out) as tmp:
        for key in opts.formats:
            file, kind = ARTIFACT_FILES[key]
            path = tmp / file
            say(f"export {key}: writing {file} ...")
            t0 = time.perf_counter()
            if key == "torchscript":
                embedded = {k: v for k, v in manifest.items() if k != "artifacts"}
                extra = fmt.write_torchscript(net, example, path, embedded)
            else:
                program = program or fmt.export_program(net, example, opts.max_batch)
                extra = (fmt.write_onnx(program, path, opts.opset) if key == "onnx"
                         else write_cpu_pt2(program, path, opts.pt2_static_batches, opts.pt2_isa, opts.pt2_program))
            if kind == "onnx":
                embed_onnx_metadata(path, manifest)  # before hashing: the sha256 covers it
            seconds = time.perf_counter() - t0
            art = {"file": file, "format": kind, "sha256": file_sha256(path), "bytes": path.stat().st_size, **extra}
            if extra.get("data_files"):
                art["data_sha256"] = {d: file_sha256(tmp / d) for d in extra["data_files"]}
            art["export_seconds"] = round(seconds, 2)
            if key != "onnx":
                art.update(device="cpu", precision="fp32")  # ONNX is device-neutral: no device field
            if opts.verify:
                run = fmt.open_runtime(path, kind, static_batch_models=extra.get("static_batch_models"))
                art["parity"] = check_parity(eager, run, val.images, key, opts.max_batch,
                                             opts.tolerance, val.source)
                say(f"  {key}: max abs diff {art['parity']['max_abs_diff']:.2g} at batch sizes "
                    f"{art['parity']['batch_sizes']} ({seconds:.1f}s)")
            if key == "onnx" and cuda and opts.verify:
                from .cuda_export import verify_onnx_on_cuda

                art["parity_cuda"] = verify_onnx_on_cuda(opts, path, loaded.model, spec, val, say)
            manifest["artifacts"][key] = art
        if cuda:
            from .cuda_export import build_cuda_artifacts

            embedded = {k: v for k, v in manifest.items() if k != "artifacts"}
            manifest["artifacts"].update(build_cuda_artifacts(opts, tmp, loaded.model, spec, val, embedded, say))
        if opts.verify_precisions:
            from .precision import verify_bf16

            onnx = manifest["artifacts"]["onnx"]
            onnx["precision_checks"] = {"bf16": verify_bf16(tmp / onnx["file"], eager, val, opts.max_batch,
                                                            opts.max_accuracy_drop, say)}
        if opts.quantize:
            manifest["artifacts"]["onnx_int8"] = _int8(opts, tmp, manifest, spec, eager, val, say)
        write_manifest(tmp, manifest)
    say(f"bundle: {out}")
    return out, manifest


PROGRAM_FILE = "model.program.pt2"


def write_cpu_pt2(program, path: Path, static_batches, isa: str, with_program: bool = True) -> dict:
    """model.pt2 compiled for ``isa`` plus (with_program) the ExportedProgram next to it, model.program.pt2,
    for 'python -m export recompile'; returns the manifest fields both add to the pt2 entry."""
    extra = {**fmt.write_pt2(program, path, tuple(static_batches), isa), "compiled_for": compiled_for(isa)}
    if with_program:
        prog = path.parent / PROGRAM_FILE
        fmt.write_program(program, prog)
        extra["program"] = {"file": PROGRAM_FILE, "format": "torch.export", "sha256": file_sha256(prog),
                            "bytes": prog.stat().st_size}
    return extra


def _int8(opts, tmp: Path, manifest: dict, spec, eager, val, say) -> dict:
    """Quantize the fp32 ONNX, then gate it on top-1: losing more than --max-accuracy-drop points
    raises AccuracyError (a ParityError), so the staged bundle is removed and nothing is written."""
    from .quantize import int8_accuracy, quantize_int8

    file, kind = ARTIFACT_FILES["onnx_int8"]
    path = tmp / file
    cal = calibration_images(spec, opts.calibration, opts.calibration_count)
    say(f"quantize int8: calibrating ({opts.calibration_method}) on {len(cal)} images from {cal.source} ...")
    t0 = time.perf_counter()
    quant = quantize_int8(tmp / manifest["artifacts"]["onnx"]["file"], path, cal.images, opts.calibration_method)
    embed_onnx_metadata(path, manifest)
    seconds = time.perf_counter() - t0
    run = fmt.open_runtime(path, kind)
    quant.update(calibration_source=cal.source, validation_source=val.source)
    quant.update(int8_accuracy(eager, run, val, opts.max_batch, opts.max_accuracy_drop))
    say(f"  int8: top-1 {quant['top1_int8']:.4f} vs fp32 {quant['top1_fp32']:.4f} on {len(val)} images "
        f"({quant['top1_drop']:.2f} points lost, allowed {opts.max_accuracy_drop:g})")
    if 100 / len(val) > opts.max_accuracy_drop:
        say(f"  note: one image is {100 / len(val):.2f} points of these {len(val)}; the check is coarse "
            "(give --data a larger validation split)")
    art = {"file": file, "format": kind, "sha256": file_sha256(path), "bytes": path.stat().st_size,
           "quantization": quant, "export_seconds": round(seconds, 2)}
    if opts.verify:  # measured, not gated: int8 is judged by top-1 above
        art["parity"] = check_parity(eager, run, val.images, "onnx_int8", opts.max_batch, None, val.source)
    return art
