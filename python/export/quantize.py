"""int8 ONNX: onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations).

    quantize_int8("model.onnx", "model.int8.onnx", calibration_images)   # (N, 3, H, W) uint8

The fp32 model is first run through ``quant_pre_process`` (shape inference + graph optimisation),
then calibrated (MinMax) on real images fed exactly as a consumer would: uint8 pixels.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .manifest import INPUT_NAME


def _reader(images: torch.Tensor, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, images.shape[0], batch))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {INPUT_NAME: images[i:i + batch].contiguous().numpy()}

    return _Batches()


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: torch.Tensor,
                  batch: int = 16) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration.shape[0] == 0:
        raise ValueError("int8 quantization needs at least one calibration image")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=False)
        quantize_static(str(prepped), str(out_path), _reader(calibration, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=False)
    return {"method": "onnxruntime quantize_static", "format": "QDQ", "per_channel": True,
            "activations": "uint8", "weights": "int8", "calibrate_method": "MinMax",
            "calibration_images": int(calibration.shape[0])}
