"""int8 ONNX: onnxruntime static quantization (QDQ, per-channel int8 weights in a 7-bit range, uint8 activations).

    quantize_int8("model.onnx", "model.int8.onnx", calibration_images, method="entropy")  # (N, 3, H, W) uint8
    int8_accuracy(eager, open_runtime("model.int8.onnx", "onnx"), labelled_val, max_batch=64, max_drop=1.0)

The fp32 model is first run through ``quant_pre_process`` (shape inference + graph optimisation),
then calibrated (``method``: minmax, entropy or percentile, onnxruntime's ``CalibrationMethod``) on
real images fed exactly as a consumer would: uint8 pixels.

What stays in float (``keep_float``, default ``"softmax+head"``): the Softmax that ends every bundle
graph and the classifier layer that feeds it (its Gemm, or MatMul + Add). Quantized, the Softmax
output is a uint8 tensor, so every probability is a multiple of about 1/256, confidences below one
step read as 0 and near classes tie in the top-k; a quantized head puts the logits themselves on an
int8 grid, which still ties classes exactly (3 of 359 digits images with percentile calibration,
none with the head in float; docs/export.md, "int8"). Both cost nothing next to the convolutions
(resnet50: the head is 0.05% of the multiply-adds). ``"softmax"`` and ``"none"`` (onnxruntime's
default op list, the old behaviour) remain for measurement (benchmarks/int8.py).

Weights use 7 of their 8 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2-only, AVX-512 before
Cascade Lake, AMD before Zen 4) onnxruntime's uint8 x int8 kernel sums pairs of products in int16
(VPMADDUBSW), and 255 x 127 x 2 overflows it. On an AVX2-only AMD EPYC, test_int8.py's trained digits
CNN (fp32 top-1 95.5% on 359 images) agreed with fp32 on 77-82% of the images with full-range weights
(int8 top-1 76-81%) and on 98.6-99.4% with 7-bit ones, for each calibration method. A bundle is built
once and runs on any CPU, so the range is not chosen per machine; ``reduce_range=False`` is for
measurement only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .manifest import INPUT_NAME
from .verify import ParityError, run_chunked

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
KEEP_FLOAT = ("softmax+head", "softmax", "none")
HEAD_OP_TYPES = ("Gemm", "MatMul")
ENTROPY_BINS = 2048


def _reader(images: torch.Tensor, batch: int):
    """Calibration batches of one size: the largest divisor of the image count up to ``batch``.
    onnxruntime's histogram collectors (percentile, entropy) stack each tensor's per-batch outputs
    with np.asarray, which fails on a shorter last batch (72 images in batches of 16)."""
    from onnxruntime.quantization import CalibrationDataReader

    n = images.shape[0]
    batch = max(d for d in range(1, min(batch, n) + 1) if n % d == 0)

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, images.shape[0], batch))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {INPUT_NAME: images[i:i + batch].contiguous().numpy()}

    return _Batches()


def float_nodes(model_path: str | os.PathLike, keep_float: str = "softmax+head") -> list[str]:
    """Names of the nodes to leave in float: each Softmax and, for ``softmax+head``, the Gemm (or
    MatMul + bias Add) whose output it takes. Only that one layer: a transformer's attention MatMuls stay int8."""
    import onnx

    if keep_float not in KEEP_FLOAT:
        raise ValueError(f"unknown keep_float {keep_float!r}; use one of {', '.join(KEEP_FLOAT)}")
    if keep_float == "none":
        return []
    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    names = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        names.append(softmax.name)
        head = producer.get(softmax.input[0])
        if keep_float == "softmax" or head is None:
            continue
        if head.op_type == "Add":  # MatMul + Add: the bias of a Linear exported without Gemm
            matmul = [producer[i] for i in head.input if i in producer and producer[i].op_type in HEAD_OP_TYPES]
            names += [head.name, matmul[0].name] if matmul else []
        elif head.op_type in HEAD_OP_TYPES:
            names.append(head.name)
    return names


def _entropy_ranges(model: Path, reader, tmp: Path) -> Path:
    """Entropy calibration with 2048 histogram bins, saved as a calibration cache for quantize_static.

    quantize_static cannot set the bin count, and with onnxruntime's default (128 bins for 128
    quantized bins) the KL search has one candidate, the full range: the model came out byte for
    byte identical to MinMax's (measured on the digits and textures models). 2048 bins for 128 is
    the split TensorRT's entropy calibrator uses."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(model, None, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy, providers=["CPUExecutionProvider"],
                                   extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128})
    calibrator.collect_data(reader)
    cache = tmp / "entropy_ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: torch.Tensor,
                  method: str = "minmax", batch: int = 16, keep_float: str = "softmax+head",
                  reduce_range: bool = True) -> dict:
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
        if keep_float != "none" and not excluded:  # every bundle graph ends in a Softmax: else a new exporter
            raise ValueError(f"no Softmax node in {fp32_path}; cannot keep the probabilities in float")
        calibrate_method = getattr(CalibrationMethod, CALIBRATION_METHODS[method])
        reader, cache = _reader(calibration, batch), None
        if method == "entropy":
            cache, reader = _entropy_ranges(prepped, reader, Path(tmp)), None
        quantize_static(str(prepped), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=calibrate_method, calibration_cache_path=cache,
                        nodes_to_exclude=excluded, use_external_data_format=False,
                        calibration_providers=["CPUExecutionProvider"])  # onnxruntime-gpu: calibrate on CPU
    return {"method": "onnxruntime quantize_static", "format": "QDQ", "per_channel": True,
            "activations": "uint8", "weights": "int8", "reduce_range": reduce_range,
            "calibrate_method": CALIBRATION_METHODS[method],
            **({"histogram_bins": ENTROPY_BINS} if method == "entropy" else {}),
            "keep_float": keep_float, "float_nodes": excluded,
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
