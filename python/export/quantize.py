"""int8 ONNX: onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations).

    quantize_int8("model.onnx", "model.int8.onnx", calibration_images, method="entropy")  # (N, 3, H, W) uint8
    int8_accuracy(eager, open_runtime("model.int8.onnx", "onnx"), labelled_val, max_batch=64, max_drop=1.0)

The fp32 model is first run through ``quant_pre_process`` (shape inference + graph optimisation),
then calibrated (``method``: minmax, entropy or percentile, onnxruntime's ``CalibrationMethod``) on
real images fed exactly as a consumer would: uint8 pixels.

What stays in float (``FLOAT_OP_TYPES``): the Softmax that ends every bundle graph. Quantized, its
output is a uint8 tensor scaled by 1/255 or so, so every probability is a multiple of that step, the
top-k of similar classes tie, and confidences below one step read as exactly 0; the Softmax costs
nothing next to the convolutions, so keeping it in float is free. The final Gemm stays quantized: on
the digits and textures models (docs/export.md, "int8") keeping it in float changed top-1 by less
than one image and the logits it feeds are already only as fine as its int8 input.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .manifest import INPUT_NAME
from .verify import ParityError, run_chunked

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
FLOAT_OP_TYPES = ("Softmax",)


def _reader(images: torch.Tensor, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, images.shape[0], batch))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {INPUT_NAME: images[i:i + batch].contiguous().numpy()}

    return _Batches()


def float_nodes(model_path: str | os.PathLike, op_types=FLOAT_OP_TYPES) -> list[str]:
    """Names of the nodes of ``op_types`` in the graph (they are named by ``quant_pre_process``)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in op_types]


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: torch.Tensor,
                  method: str = "minmax", batch: int = 16, keep_float=FLOAT_OP_TYPES) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if calibration.shape[0] == 0:
        raise ValueError("int8 quantization needs at least one calibration image")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=False)
        excluded = float_nodes(prepped, keep_float)
        if keep_float and not excluded:  # every bundle graph ends in a Softmax: its absence means a new exporter
            raise ValueError(f"no {'/'.join(keep_float)} node in {fp32_path}; cannot keep the probabilities in float")
        quantize_static(str(prepped), str(out_path), _reader(calibration, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                        nodes_to_exclude=excluded, use_external_data_format=False,
                        calibration_providers=["CPUExecutionProvider"])  # onnxruntime-gpu: calibrate on CPU
    return {"method": "onnxruntime quantize_static", "format": "QDQ", "per_channel": True,
            "activations": "uint8", "weights": "int8", "calibrate_method": CALIBRATION_METHODS[method],
            "float_op_types": list(keep_float), "float_nodes": excluded,
            "calibration_images": int(calibration.shape[0])}


class AccuracyError(ParityError):
    """The int8 model loses more top-1 than allowed; nothing was written."""


def int8_accuracy(reference, run, val, max_batch: int, max_drop: float) -> dict:
    """Top-1 of the int8 model against the fp32 ``reference`` on labelled ``val`` images; raises
    AccuracyError when it loses more than ``max_drop`` percentage points."""
    if val.labels is None:
        raise ValueError("int8_accuracy needs labelled validation images")
    labels = torch.tensor(val.labels)
    ref = run_chunked(reference, val.images, max_batch).argmax(-1)
    got = run_chunked(run, val.images, max_batch).argmax(-1)
    n, c32, c8 = len(labels), int((ref == labels).sum()), int((got == labels).sum())
    # from counts, not from rounded fractions: 0.99 - 0.98 is 0.010000000000000009
    drop = (c32 - c8) * 100 / n
    q = {"top1_fp32": c32 / n, "top1_int8": c8 / n, "top1_drop": round(drop, 4), "max_accuracy_drop": max_drop,
         "correct_fp32": c32, "correct_int8": c8, "validation_images": n,
         "top1_agreement": float((ref == got).double().mean())}
    if drop > max_drop + 1e-9:
        raise AccuracyError(f"int8: top-1 {c8}/{n} = {100 * c8 / n:.2f}% vs fp32 {c32}/{n} = {100 * c32 / n:.2f}% on "
                            f"{val.source}: {drop:.2f} points lost, more than --max-accuracy-drop {max_drop:g}. No "
                            "bundle was written. Try another --calibration-method (entropy, percentile), more "
                            "representative --calibration images or a larger --calibration-count, or export without "
                            "--quantize and serve the fp32 artifacts.")
    return q
