"""model.onnx and model.int8.onnx on OpenVINO's CPU plugin, in fp32 or bf16.

    from export import load_bundle
    load_bundle("bundles/resnet50", backend="openvino", threads=2, precision="bf16")   # bf16 CPU + verified bundle
    run = open_openvino(read_artifact(folder, manifest, "onnx"), threads=2, precision="fp32")

No new artifact: OpenVINO reads the bundle's ONNX files, from the bytes whose sha256 the loader
checked (external weights inlined in memory, never read from the path again). Every setting that
decides speed is passed explicitly to ``compile_model``: INFERENCE_NUM_THREADS (``threads``, default
every usable core), NUM_STREAMS 1 and PERFORMANCE_HINT LATENCY (one call at a time uses every
thread: the server's layout decides the concurrency, not the plugin), and INFERENCE_PRECISION_HINT
always (OpenVINO's default on a bf16 CPU is bf16: left unset, an fp32 request would silently run
bf16). Every load compiles on the process's one ``ov.Core`` (``shared_core``): nothing is set on the Core
itself, and a Core per load left threads with an unmapped signal stack when the Cores were freed out of
order (export.sigstack says how that ended processes).

bf16 is real only where the CPU has native bf16 (AVX-512 BF16 or AMX-BF16); elsewhere OpenVINO
would run fp32 under a bf16 label, so ``bf16`` is refused there (``cpu_native_bf16``).
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .manifest import INPUT_NAME, BundleError, VerifiedArtifact
from .sigstack import ensure_signal_stack

# our precision name -> OpenVINO's INFERENCE_PRECISION_HINT
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"
OV_INSTALL_HINT = "install it with 'pip install openvino' (a dependency of this project: 'pip install -e .')"


@dataclass(frozen=True)
class CpuRecord:
    """What decides whether bf16 runs natively: the CPU flags (/proc/cpuinfo) and OpenVINO's own
    OPTIMIZATION_CAPABILITIES. Faked in tests to play a CPU without bf16."""
    flags: frozenset[str]
    ov_capabilities: frozenset[str] = frozenset()
    source: str = CPUINFO

    @property
    def native_bf16(self) -> bool:
        """Both must agree when both are known: the ISA flag says the hardware has it, OpenVINO's BF16
        capability that this OpenVINO will use it (OpenVINO 2026.4 still reports BF16 under
        ONEDNN_MAX_CPU_ISA=AVX2, where it cannot compile bf16: that cap and SHIPCLASSIFIER_NO_BF16=1 hide both,
        cpu_record)."""
        hw = any(f in self.flags for f in BF16_CPU_FLAGS)
        if self.ov_capabilities:
            return hw and "BF16" in self.ov_capabilities if self.flags else "BF16" in self.ov_capabilities
        return hw

    def describe(self) -> str:
        have = [f for f in BF16_CPU_FLAGS if f in self.flags]
        return (f"CPU bf16: {'native (' + ', '.join(have) + ')' if self.native_bf16 else 'none'}"
                + (f"; OpenVINO capabilities {','.join(sorted(self.ov_capabilities))}" if self.ov_capabilities else "")
                + (f"; from {self.source}" if self.source != CPUINFO else ""))


def read_cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_CPU: CpuRecord | None = None
# set to 1: this CPU counts as one without native bf16 (flags and OpenVINO's BF16 capability hidden), as an
# AVX2-only machine would be
NO_BF16_ENV = "SHIPCLASSIFIER_NO_BF16"
# oneDNN's ISA cap: OpenVINO 2026.4 still reports BF16 under ONEDNN_MAX_CPU_ISA=AVX2, but then finds no bf16
# kernel for some layers ("Supported primitive descriptors list is empty for node ... Pooling") and cannot
# compile the model in bf16 at all; a cap below the bf16 ISAs therefore hides bf16 like NO_BF16_ENV.
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")


def onednn_cap_hides_bf16() -> bool:
    """ONEDNN_MAX_CPU_ISA is set to an ISA without bf16 (SSE41, AVX, AVX2, AVX2_VNNI, AVX512_CORE, ...)."""
    cap = os.environ.get(ONEDNN_ISA_ENV, "").strip().upper()
    return bool(cap) and not cap.startswith(_ONEDNN_BF16_ISAS)


_CORE = None
_CORE_LOCK = threading.Lock()


def shared_core():
    """The process's one ``ov.Core``, its CPU plugin loaded; never freed before exit.

    Loading the plugin replaces the calling thread's signal stack with OpenVINO's own 11-12 KB one;
    ensure_signal_stack then gives that thread a stack that holds an AMX signal frame and its handler."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino as ov

            core = ov.Core()
            try:
                core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")   # loads the CPU plugin now, in this thread
            finally:
                ensure_signal_stack()
            _CORE = core
        return _CORE


def cpu_record(refresh: bool = False) -> CpuRecord:
    """This machine's CpuRecord (read once; OpenVINO asked through the shared Core)."""
    global _CPU
    if _CPU is None or refresh:
        caps: frozenset[str] = frozenset()
        try:
            caps = frozenset(shared_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # no openvino, or no CPU plugin: the flags alone decide
            pass
        flags, source = read_cpu_flags(), CPUINFO
        hidden_by = (NO_BF16_ENV if os.environ.get(NO_BF16_ENV, "") not in ("", "0") else
                     f"{ONEDNN_ISA_ENV}={os.environ[ONEDNN_ISA_ENV]}" if onednn_cap_hides_bf16() else None)
        if hidden_by:
            flags, caps = flags - set(BF16_CPU_FLAGS), caps - {"BF16"}
            source += f" ({hidden_by}: bf16 hidden)"
        _CPU = CpuRecord(flags, caps, source)
    return _CPU


def cpu_native_bf16() -> bool:
    return cpu_record().native_bf16


def onnx_model_bytes(source: VerifiedArtifact | str | os.PathLike) -> bytes:
    """The ONNX model as one self-contained protobuf: external weights (model.onnx.data) copied in from
    the checked bytes. OpenVINO reading a model from memory cannot resolve external data by itself."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    if not isinstance(source, VerifiedArtifact):
        return onnx.load(str(source)).SerializeToString()   # a file just written (export): onnx resolves it
    proto = onnx.load_from_string(source.model_bytes)
    for tensor in proto.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        blob = source.files.get(info.get("location", ""))
        if blob is None:
            raise BundleError(f"{source.path}: tensor {tensor.name} names external data {info.get('location')!r}, "
                              "which the manifest does not list (data_files); re-export the bundle", "integrity")
        offset = int(info.get("offset", 0))
        length = int(info.get("length", len(blob) - offset))
        tensor.raw_data = bytes(blob[offset:offset + length])
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return proto.SerializeToString()


def compile_config(threads: int, precision: str) -> dict:
    """The compile_model properties, all explicit (module docstring says why each)."""
    if precision not in OV_PRECISION:
        raise BundleError(f"OpenVINO precision {precision!r}: use one of {', '.join(OV_PRECISION)}")
    return {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision]}


def open_openvino(source: VerifiedArtifact | str | os.PathLike, threads: int | None = None, precision: str = "fp32",
                  cpu: CpuRecord | None = None):
    """-> run(uint8 NCHW tensor) -> (N, K) float32 tensor, on OpenVINO's CPU plugin.

    Thread-safe: each concurrent call takes its own infer request from a pool (one compiled model,
    NUM_STREAMS 1, so calls share its threads). ``run.config`` holds the properties as compiled."""
    try:
        import openvino  # noqa: F401  (shared_core imports it; here for the message)
    except ImportError as exc:
        raise BundleError(f"backend 'openvino' needs the openvino package ({exc}); {OV_INSTALL_HINT}") from None
    if precision == "bf16" and not (cpu or cpu_record()).native_bf16:
        raise BundleError(f"bf16 on OpenVINO needs a CPU with native bf16 (AVX-512 BF16 or AMX); this one has none "
                          f"({(cpu or cpu_record()).describe()}), where OpenVINO would run fp32 under a bf16 label; "
                          "use "
                          "precision fp32")
    config = compile_config(threads or _cores(), precision)
    core = shared_core()
    where = str(source.path) if isinstance(source, VerifiedArtifact) else str(source)
    try:
        model = core.read_model(onnx_model_bytes(source))
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError as exc:
        raise BundleError(f"{where}: OpenVINO could not load it: {str(exc).strip().splitlines()[-1]}") from None
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    got = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    if got != OV_PRECISION[precision]:
        raise BundleError(f"{where}: OpenVINO compiled it for {got}, not the {precision} asked for")
    output = compiled.output(0)
    requests: queue.SimpleQueue = queue.SimpleQueue()

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            req = requests.get_nowait()
        except queue.Empty:
            req = compiled.create_infer_request()
        try:
            arr = np.ascontiguousarray(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x))
            out = req.infer({INPUT_NAME: arr})[output]
            return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))  # the request reuses its buffer
        finally:
            requests.put(req)

    run.config = {**config, "compiled_precision": got}
    return run


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def openvino_version() -> str:
    import openvino as ov

    return ov.get_version().split("-")[0]
