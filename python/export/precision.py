"""bf16 verified at export: model.onnx on OpenVINO in bf16 against eager fp32 on labelled images.

    python -m export --checkpoint runs/x/best.pt --format onnx --verify-precision bf16 --data data/x --out bundles/x

The result goes into the manifest (``artifacts.onnx.precision_checks.bf16``, docs/BUNDLE.md); the
loader's ``precision="auto"`` (and the server's default) runs bf16 only on a bundle that has it. A
top-1 loss over ``--max-accuracy-drop`` points fails the export (exit 1) and leaves no bundle, the
same gate as int8 (export.quantize.int8_accuracy).
"""
from __future__ import annotations

import torch

from .manifest import BundleError
from .quantize import AccuracyError
from .verify import run_chunked

VERIFY_PRECISIONS = ("bf16",)


def check_precision_options(precisions: list[str], cpu=None) -> None:
    """Refuse before any work: an unknown precision, or bf16 on a CPU that would not really run it."""
    bad = [p for p in precisions if p not in VERIFY_PRECISIONS]
    if bad:
        raise BundleError(f"--verify-precision {' '.join(bad)}: only {', '.join(VERIFY_PRECISIONS)} can be verified "
                          "(fp32 is the reference)")
    if not precisions:
        return
    from .openvino_backend import cpu_record

    cpu = cpu or cpu_record()
    if not cpu.native_bf16:
        raise BundleError(f"--verify-precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX) to measure it "
                          f"on; this one has none ({cpu.describe()}). Export on such a machine, or without "
                          "--verify-precision (the bundle then runs fp32 everywhere)")


def reduced_precision_accuracy(reference, run, val, max_batch: int, max_drop: float, precision: str = "bf16") -> dict:
    """Top-1 and probability gap of ``run`` (the model in ``precision``) against the fp32 ``reference``
    on labelled ``val`` images; raises AccuracyError when top-1 loses more than ``max_drop`` points."""
    if val.labels is None:
        raise ValueError("reduced_precision_accuracy needs labelled validation images")
    labels = torch.tensor(val.labels)
    ref = run_chunked(reference, val.images, max_batch).float()
    got = run_chunked(run, val.images, max_batch).float()
    gap = (ref - got).abs().amax(-1)   # per image: the largest probability difference
    n = len(labels)
    c32, cr = int((ref.argmax(-1) == labels).sum()), int((got.argmax(-1) == labels).sum())
    drop = (c32 - cr) * 100 / n   # from counts (int8_accuracy says why)
    q = {"top1_fp32": c32 / n, f"top1_{precision}": cr / n, "correct_fp32": c32, f"correct_{precision}": cr,
         "top1_drop": round(drop, 4), "max_accuracy_drop": max_drop, "validation_images": n,
         "validation_source": val.source,
         "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
         "max_prob_gap": float(gap.max()) if n else 0.0, "mean_prob_gap": float(gap.mean()) if n else 0.0}
    if drop > max_drop + 1e-9:
        raise AccuracyError(f"{precision}: top-1 {cr}/{n} = {100 * cr / n:.2f}% vs fp32 {c32}/{n} = "
                            f"{100 * c32 / n:.2f}% on {val.source}: {drop:.2f} points lost, more than "
                            f"--max-accuracy-drop {max_drop:g}. No bundle was written. Export without "
                            f"--verify-precision (the bundle then runs fp32 everywhere), or check the model's "
                            f"{precision} numerics.")
    return q


def verify_bf16(onnx_path, reference, val, max_batch: int, max_drop: float, say=print) -> dict:
    """The manifest record for ``precision_checks.bf16`` of model.onnx (OpenVINO bf16 vs eager fp32)."""
    from . import openvino_backend as ovb

    run = ovb.open_openvino(onnx_path, precision="bf16")
    rec = {"runtime": f"openvino {ovb.openvino_version()}", "inference_precision": run.config["compiled_precision"],
           **reduced_precision_accuracy(reference, run, val, max_batch, max_drop, "bf16")}
    say(f"  bf16 (OpenVINO): top-1 {rec['top1_bf16']:.4f} vs fp32 {rec['top1_fp32']:.4f} on {rec['validation_images']} "
        f"images ({rec['top1_drop']:.2f} points lost, allowed {max_drop:g}); largest probability gap "
        f"{rec['max_prob_gap']:.3g}")
    return rec
