"""Devices for export and inference: parsing ``cpu`` / ``cuda`` / ``cuda:N`` and onnxruntime providers.

    from export.devices import parse_device, require_cuda, ort_providers
    dev = parse_device("cuda:1")        # Device(kind="cuda", index=1); "cuda" means index 0
    require_cuda(dev, "--device")        # BundleError on a machine without that CUDA device
    providers = ort_providers(dev)       # [("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]

One onnxruntime serves both: ``onnxruntime-gpu`` (the dependency on Linux x86-64) runs on the CPU
too. Asked for CUDA where CUDA cannot run, onnxruntime logs an error and silently falls back to the
CPU, so ``check_session_providers`` compares what the session really got with what was asked for.
Nothing here touches CUDA unless a CUDA device was asked for: a CPU-only machine stays quiet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .manifest import BundleError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d{1,3}))?$")
ORT_CUDA, ORT_TENSORRT, ORT_CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


@dataclass(frozen=True)
class Device:
    kind: str  # cpu | cuda
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"


def parse_device(text: str) -> Device:
    m = _DEVICE.match(str(text).strip())
    if not m or (m.group(1) == "cpu" and m.group(2) is not None):
        raise BundleError(f"unknown device {text!r}; use cpu, cuda or cuda:N (N a CUDA device index)")
    return Device(m.group(1), int(m.group(2) or 0))


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_cuda(device: Device, what: str = "device") -> None:
    """Raise BundleError unless ``device`` is the CPU or a CUDA device this machine has."""
    if not device.is_cuda:
        return
    have = cuda_device_count()
    if have == 0:
        raise BundleError(f"{what} {device}: no CUDA device is usable here (torch.cuda.is_available() is False: no "
                          "GPU, driver, or a CPU-only torch); run this on a GPU machine or use device cpu")
    if device.index >= have:
        raise BundleError(f"{what} {device}: this machine has {have} CUDA device(s); use cuda:0..cuda:{have - 1}")


def preload_cuda_libraries() -> None:
    """Make the CUDA and cuDNN libraries of the torch CUDA wheel (nvidia-* packages) visible to
    onnxruntime-gpu, so no system CUDA toolkit is needed. Only called once CUDA was asked for."""
    import torch  # noqa: F401 - torch's import loads libcudart/cublas/cudnn from the same wheels
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21
        ort.preload_dlls(cuda=True, cudnn=True, msvc=False)


def ort_providers(device: Device, tensorrt: bool = False) -> list:
    """Execution providers (with options) for an onnxruntime session on ``device``.

    CUDA: the CUDA provider pinned to the device index, the CPU provider after it for the few
    nodes CUDA lacks; TensorRT first when asked for (opt-in: it compiles engines on first use).
    """
    if not device.is_cuda:
        if tensorrt:
            raise BundleError("TensorRT needs a CUDA device; use device cuda[:N] or drop tensorrt")
        return [ORT_CPU]
    opts = {"device_id": str(device.index)}
    providers: list = [(ORT_CUDA, dict(opts)), ORT_CPU]
    if tensorrt:
        providers.insert(0, (ORT_TENSORRT, dict(opts)))
    return providers


def check_available_providers(device: Device, tensorrt: bool = False) -> None:
    import onnxruntime as ort

    if not device.is_cuda:
        return
    have = ort.get_available_providers()
    if ORT_CUDA not in have:
        raise BundleError(f"device {device} needs onnxruntime-gpu, but the installed onnxruntime "
                          f"{ort.__version__} has only {have}; pip install onnxruntime-gpu (the project's dependency "
                          "on Linux x86-64) in place of onnxruntime")
    if tensorrt and ORT_TENSORRT not in have:
        raise BundleError(f"tensorrt: this onnxruntime has no TensorRT provider ({have}); install TensorRT for "
                          "onnxruntime-gpu or drop tensorrt")


def check_session_providers(session, device: Device, tensorrt: bool = False, path: str = "") -> list[str]:
    """The session's providers; BundleError when CUDA (or TensorRT) was asked for and not loaded,
    which onnxruntime itself only logs before running everything on the CPU."""
    got = list(session.get_providers())
    want = [ORT_TENSORRT, ORT_CUDA] if tensorrt else [ORT_CUDA]
    if device.is_cuda and any(p not in got for p in want):
        raise BundleError(f"{path or 'onnxruntime'}: asked for {', '.join(want)} on {device} but the session got "
                          f"{got} (onnxruntime fell back to the CPU; its log above says why: usually CUDA 13 / "
                          "cuDNN 9 libraries not found or a driver too old). Fix the CUDA install or use device cpu")
    return got
