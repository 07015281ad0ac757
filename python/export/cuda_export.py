"""CUDA artifacts of a bundle, written next to the CPU ones.

    python -m export --checkpoint runs/digits/best.pt --format all --data data/digits --out bundles/digits \
        --device cuda --precision fp32 fp16

For each precision asked for, TorchScript (traced on the GPU) and AOTInductor ``.pt2`` (compiled for
this GPU's architecture) go in as ``torchscript_cuda[_fp16|_bf16]`` and ``pt2_cuda[_fp16|_bf16]``,
each with ``device: "cuda"``, its ``precision`` and the GPU it was compiled on; ``model.onnx`` is
device-neutral and is verified on the CUDA execution provider as well (``parity_cuda``).

Reference: eager PyTorch in fp32 on the same GPU. fp32 artifacts must match it within
``cuda_tolerance`` (default 1e-3, not 1e-4: cuDNN runs fp32 convolutions in TF32 by default, in the
artifacts and in eager alike, and inductor's freezing folds batch norm into the weights before
rounding); fp16/bf16 variants within ``half_tolerance`` (default fp16 1e-2, bf16 5e-2), and on the
validation images their top-1 may not lose more than one point against fp32 (labelled images) or
disagree with fp32 on more than 1% of them (unlabelled).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from . import formats as fmt
from .devices import parse_device
from .graph import example_batch, probability_model
from .manifest import ARTIFACT_FILES, artifact_key, file_sha256
from .verify import ParityError, check_parity, run_chunked

CUDA_FAMILIES = ("torchscript", "pt2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA_FP32_TOLERANCE = 1e-3
HALF_TOLERANCE = {"fp16": 1e-2, "bf16": 5e-2}
MAX_TOP1_LOSS = 0.01  # fp16/bf16: at most one point of top-1 (or 1% disagreement) against fp32


def compiled_for(index: int) -> dict:
    """The GPU an artifact was compiled on: a .pt2's kernels are built for this architecture only."""
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}", "cuda": torch.version.cuda}


def half_quality(reference, run, val, max_batch: int, precision: str) -> dict:
    """Top-1 of a reduced-precision artifact against the fp32 reference on the validation images;
    raises ParityError when it loses more than MAX_TOP1_LOSS."""
    ref = run_chunked(reference, val.images, max_batch).argmax(-1)
    got = run_chunked(run, val.images, max_batch).argmax(-1)
    q = {"images": len(val), "source": val.source, "top1_agreement": float((ref == got).double().mean())}
    if val.labels is not None:
        labels = torch.tensor(val.labels)
        q["top1_fp32"] = float((ref == labels).double().mean())
        q[f"top1_{precision}"] = float((got == labels).double().mean())
        loss = q["top1_fp32"] - q[f"top1_{precision}"]
        what = f"top-1 {q[f'top1_{precision}']:.4f} vs fp32 {q['top1_fp32']:.4f}"
    else:
        loss = 1.0 - q["top1_agreement"]
        what = f"top-1 agrees with fp32 on {100 * q['top1_agreement']:.1f}% of the images"
    if loss > MAX_TOP1_LOSS + 1e-9:  # exactly one point lost is allowed (0.99 vs 1.0 is 0.01000...0009)
        raise ParityError(f"{precision}: {what} on {len(val)} images from {val.source}: more than "
                          f"{100 * MAX_TOP1_LOSS:.0f} point(s) lost. Serve the fp32 artifacts, or leave {precision} "
                          "out of --precision.")
    return q


def build_cuda_artifacts(opts, tmp: Path, model: torch.nn.Module, spec, val, embedded: dict, say) -> dict:
    """Write and verify the CUDA artifacts into ``tmp``; returns {manifest key: artifact entry}."""
    dev = parse_device(opts.device)
    target = torch.device(str(dev))
    info = compiled_for(dev.index)
    fp32 = probability_model(copy.deepcopy(model), spec).to(target)

    def reference(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return fp32(x.to(target)).cpu()

    example = example_batch(spec, 2).to(target)
    families = [f for f in opts.formats if f in CUDA_FAMILIES]
    out: dict = {}
    for precision in opts.precisions:
        net = fp32 if precision == "fp32" else \
            probability_model(copy.deepcopy(model), spec, DTYPES[precision]).to(target)
        program = None
        for family in families:
            key = artifact_key(family, "cuda", precision)
            file, kind = ARTIFACT_FILES[key]
            path = tmp / file
            say(f"export {key}: writing {file} on {dev} ({info['gpu']}) ...")
            t0 = time.perf_counter()
            if family == "torchscript":
                extra = fmt.write_torchscript(net, example, path, embedded)
            else:
                program = program or fmt.export_program(net, example, opts.max_batch)
                extra = fmt.write_pt2(program, path, tuple(opts.pt2_static_batches))
            seconds = time.perf_counter() - t0
            art = {"file": file, "format": kind, "sha256": file_sha256(path), "bytes": path.stat().st_size,
                   "device": "cuda", "precision": precision, "compiled_for": info, **extra,
                   "export_seconds": round(seconds, 2)}
            if opts.verify:
                run = fmt.open_runtime(path, kind, device=str(dev),
                                       static_batch_models=extra.get("static_batch_models"))
                tol = opts.cuda_tolerance if precision == "fp32" else (opts.half_tolerance or HALF_TOLERANCE[precision])
                # fp16/bf16: top-1 is judged on all validation images below, not on the 1-5 parity images
                gate = tol if precision == "fp32" else None
                art["parity"] = check_parity(reference, run, val.images, key, opts.max_batch, gate, val.source)
                if not art["parity"]["max_abs_diff"] <= tol:  # "not <=" also catches NaN
                    raise ParityError(f"{key}: max abs probability difference {art['parity']['max_abs_diff']:.3g} "
                                      f"against eager fp32 on {dev} (allowed {tol:g}); the artifact was not written. "
                                      "Leave this precision out of --precision or raise --half-tolerance.")
                art["parity"]["tolerance"] = tol
                art["parity"]["reference"] = f"eager fp32 on {dev}"
                if precision != "fp32":
                    art["quality"] = half_quality(reference, run, val, opts.max_batch, precision)
                say(f"  {key}: max abs diff {art['parity']['max_abs_diff']:.2g} (allowed {tol:g}) ({seconds:.1f}s)")
            out[key] = art
    return out


def verify_onnx_on_cuda(opts, path: Path, model: torch.nn.Module, spec, val, say) -> dict:
    """Parity of the (device-neutral) ONNX artifact on the CUDA execution provider, through IOBinding."""
    dev = parse_device(opts.device)
    target = torch.device(str(dev))
    fp32 = probability_model(copy.deepcopy(model), spec).to(target)

    def reference(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return fp32(x.to(target)).cpu()

    run = fmt.open_runtime(path, "onnx", device=str(dev))
    parity = check_parity(reference, run, val.images, "onnx on CUDA", opts.max_batch, opts.cuda_tolerance, val.source)
    parity.update(tolerance=opts.cuda_tolerance, reference=f"eager fp32 on {dev}", provider="CUDAExecutionProvider")
    say(f"  onnx on {dev}: max abs diff {parity['max_abs_diff']:.2g} (CUDA execution provider)")
    return parity
