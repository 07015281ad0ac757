"""Writing each artifact format, and opening it again in its own runtime.

    write_torchscript(net, example, "model.ts", embedded_manifest)
    program = export_program(net, example, max_batch=64)   # torch.export, dynamic batch 1..64
    write_onnx(program, "model.onnx", opset=18)
    write_pt2(program, "model.pt2", isa="avx2") # dynamic batch + a static batch-1 model, for x86-64-v3 CPUs
    write_program(program, "model.program.pt2") # the ExportedProgram, to recompile the .pt2 elsewhere
    run = open_runtime("model.onnx", "onnx", threads=2)   # run(uint8 NCHW tensor) -> probs tensor
    run = open_runtime("model.onnx", "onnx", device="cuda:0", keep_on_device=True)  # CUDA EP, IOBinding
    run = open_runtime(read_artifact("bundles/digits", manifest, "onnx"), "onnx")  # from the checked bytes

Every writer takes the ProbabilityModel (uint8 in, probabilities out) and an example batch of at
least 2 images, so the dynamic batch dimension is never specialised to 1.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .devices import (check_available_providers, check_session_providers, ort_providers, parse_device,
                      preload_cuda_libraries, require_cuda)
from .manifest import INPUT_NAME, OUTPUT_NAME, BundleError, VerifiedArtifact

Runtime = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) uint8 -> (N, K) float32
# onnxruntime session option: the intra-op pool stops spinning when a run returns
ORT_SPIN_STOP = "session.force_spinning_stop"
Source = str | os.PathLike | VerifiedArtifact  # a file path, or an artifact's sha256-checked bytes


def _batch_dim(max_batch: int):
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=max_batch)}}


def write_torchscript(net: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                      embedded_manifest: dict) -> dict:
    """Trace, freeze and save; the manifest rides along as the extra file 'manifest.json'."""
    with warnings.catch_warnings():
        # torch.jit.trace/freeze are deprecated in favour of torch.export but remain the format the
        # C++ runtime loads with torch::jit::load; the warning is about the API, not our graph.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        # Size checks traced as constants (timm's position-embedding resampling): the input size is fixed
        # by the manifest, so the constant holds for every input served; parity is checked afterwards.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(net, example, check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
        torch.jit.save(frozen, str(path), _extra_files={"manifest.json": json.dumps(embedded_manifest)})
    return {}


def export_program(net: nn.Module, example: torch.Tensor, max_batch: int) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension; shared by the ONNX and .pt2 writers (traced once)."""
    with torch.no_grad():
        return torch.export.export(net, (example,), dynamic_shapes=_batch_dim(max_batch))


def write_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike, opset: int) -> dict:
    import onnx

    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.onnx.export(program, (), str(path), dynamo=True, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, external_data=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    data_files = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))
    return {"opset": opset, "data_files": data_files}


PT2_DYNAMIC_MODEL = "model"


def write_pt2(program: torch.export.ExportedProgram, path: str | os.PathLike,
              static_batches: tuple[int, ...] = (1,), isa: str | None = None) -> dict:
    """AOTInductor package holding the dynamic-batch model plus one static model per size in static_batches.

    Why the static models: inductor prepacks convolution weights into oneDNN's blocked layout only when
    the input shape is fully known; with a symbolic batch every convolution reorders its weights on
    every call (resnet50, 2 threads: 58 ms at batch 1 vs 40 ms with a static batch-1 model). The
    runtimes pick the static model when the batch size matches and the dynamic one otherwise.
    isa: a resolved ``export.portable`` level (default, avx2, avx512, native) for a CPU package: inductor
    compiles for it with the thread count left to the runtime; None leaves inductor's defaults (CUDA).
    Returns {"static_batch_models": {"1": "batch1"}} for the manifest.
    """
    import logging

    from torch import _inductor
    from torch._inductor.package import package_aoti

    # "No CUDA runtime is found" is logged by the C++ toolchain probe on CPU-only machines: noise here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    (example,), _ = program.example_inputs
    programs = {PT2_DYNAMIC_MODEL: program}
    from .portable import inductor_options

    with torch.no_grad(), (inductor_options(isa) if isa else contextlib.nullcontext()):
        for n in static_batches:
            graph = program.module(check_guards=False)
            programs[f"batch{n}"] = torch.export.export(graph, (example[:1].expand(n, *example.shape[1:]).clone(),))
        files = {}
        for name, prog in programs.items():
            args, kwargs = prog.example_inputs
            # Freezing turns the weights into constants: BN folding, and weight prepacking for static shapes.
            files[name] = _inductor.aot_compile(prog.module(check_guards=False), args, kwargs,
                                                options={"freezing": True, "aot_inductor.package": True})
        package_aoti(str(path), files)
    return {"static_batch_models": {str(n): f"batch{n}" for n in static_batches}}


def write_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """torch.export.save: the portable input of ``write_pt2`` (example inputs included), so a target
    machine can compile its own .pt2 (python -m export recompile)."""
    torch.export.save(program, str(path))


# (sha256 of the .pt2's bytes, model name) -> the model loaded for the CPU. A compiled AOTInductor library
# is never unloaded once a process has loaded it: torch builds it with GNU-unique symbols, so dlclose
# leaves it mapped (its extracted file deleted, its disk space and pages held until exit). Loading the
# same bytes again would pin a second copy; the process reuses the first (the runner is stateless between
# calls and takes concurrent calls). Not for CUDA: there the runner also holds the weights in GPU memory,
# which freeing the bundle must give back.
_PT2_CPU_MODELS: dict[tuple[str, str], object] = {}
_PT2_LOCK = threading.Lock()


def load_pt2(source: Source, static_batch_models: dict | None = None, device_index: int = -1):
    """Open a .pt2 from write_pt2: returns run(x) that uses a static model when x's batch size has one.
    From checked bytes, torch writes each model's package to a private (0600) temporary file to load it.
    On the CPU a process loads each distinct package once (_PT2_CPU_MODELS): the same bytes again reuse it."""
    from torch._inductor.package import load_package

    if isinstance(source, VerifiedArtifact):   # read_artifact checked these bytes against the manifest's sha256
        data, digest = source.model_bytes, source.entry["sha256"]
    else:
        data = Path(source).read_bytes()
        digest = hashlib.sha256(data).hexdigest()

    def open_model(name: str):
        if device_index >= 0:
            return load_package(io.BytesIO(data), name, device_index=device_index)
        key = (digest, name)
        with _PT2_LOCK:
            if key not in _PT2_CPU_MODELS:
                _PT2_CPU_MODELS[key] = load_package(io.BytesIO(data), name, device_index=device_index)
            return _PT2_CPU_MODELS[key]

    dynamic = open_model(PT2_DYNAMIC_MODEL)
    static = {int(n): open_model(name) for n, name in (static_batch_models or {}).items()}

    def run(x: torch.Tensor) -> torch.Tensor:
        return static.get(x.shape[0], dynamic)(x)

    return run


def ort_session(source: Source, threads: int | None = None, device: str = "cpu", tensorrt: bool = False):
    """An onnxruntime session on ``device`` (cpu, cuda, cuda:N); raises BundleError when CUDA (or
    TensorRT, opt-in) was asked for and the session did not get it, never a silent CPU fallback.
    From a VerifiedArtifact the model and its external data files are handed over as the checked bytes."""
    import onnxruntime as ort

    dev = parse_device(device)
    if dev.is_cuda:
        require_cuda(dev, "onnxruntime device")
        check_available_providers(dev, tensorrt)
        preload_cuda_libraries()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if threads != 1 and not dev.is_cuda:
        # the pool's threads still spin between the parallel sections of one run, but park when it
        # returns: a spinning pool took the cores that the caller's next steps (answering the HTTP
        # request, decoding the next image) need. A lone resnet18 request on 2 cores: p99 10-13 ms
        # with the spin after the run, 4.6 ms without; mean unchanged (docs/server.md, Slow clients)
        opts.add_session_config_entry(ORT_SPIN_STOP, "1")
    model, where = str(source), str(source)
    if isinstance(source, VerifiedArtifact):
        model, where = source.model_bytes, str(source.path)
        data = {name: np.frombuffer(blob, np.uint8) for name, blob in source.files.items()
                if name != source.entry["file"]}
        if data:   # the external-data file names the model refers to, served from memory
            opts.add_external_initializers_from_files_in_memory(list(data), list(data.values()),
                                                                [a.size for a in data.values()])
    session = ort.InferenceSession(model, sess_options=opts, providers=ort_providers(dev, tensorrt))
    check_session_providers(session, dev, tensorrt, where)
    return session


def _onnx_cuda_runner(session, index: int, keep_on_device: bool) -> Runtime:
    """IOBinding: the input goes in from host or device memory, the probabilities are written straight
    into a torch tensor on the GPU (no copy through numpy); moved to the CPU unless keep_on_device."""
    classes = session.get_outputs()[0].shape[-1]  # static K; the batch dimension is symbolic
    device = torch.device("cuda", index)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty((x.shape[0], classes), dtype=torch.float32, device=device)  # (N, K)
        binding = session.io_binding()
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()  # onnxruntime runs on its own stream
            binding.bind_input(INPUT_NAME, "cuda", x.device.index, np.uint8, tuple(x.shape), x.data_ptr())
        else:
            binding.bind_cpu_input(INPUT_NAME, x.numpy())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)  # returns once the outputs are written
        return out if keep_on_device else out.cpu()

    return run


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` for one call and restored afterwards (None: left
    alone). torch has no per-module thread pool, only the process-wide setting: set at load time, one
    model's threads=1 used to become every later model's and the trainer's."""
    prev = torch.get_num_threads()
    if not threads or threads == prev:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def open_runtime(source: Source, fmt: str, threads: int | None = None, device: str = "cpu",
                 static_batch_models: dict | None = None, keep_on_device: bool = False,
                 tensorrt: bool = False) -> Runtime:
    """Load an artifact with its own runtime and return a callable uint8 NCHW -> probabilities.

    source: a file path (artifacts just written), or a VerifiedArtifact (export.manifest.read_artifact:
    the bytes whose sha256 was checked; every bundle reader loads that way).
    static_batch_models: the .pt2 artifact's manifest entry of that name (batch size -> model name).
    device: cpu, cuda or cuda:N. ONNX runs anywhere (CUDA execution provider, IOBinding); TorchScript
    and .pt2 artifacts must have been compiled for that device (the manifest's "device"). Inputs may
    live on the CPU or the device; outputs come back on the CPU unless keep_on_device.
    """
    dev = parse_device(device)
    if fmt == "onnx":
        session = ort_session(source, threads, str(dev), tensorrt)
        if dev.is_cuda:
            return _onnx_cuda_runner(session, dev.index, keep_on_device)

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            out = session.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().cpu().numpy()})[0]
            return torch.from_numpy(out)

        return run_onnx
    require_cuda(dev, f"{fmt} device")
    target = torch.device(str(dev))
    if fmt == "torchscript":
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the format C++ loads
            warnings.filterwarnings("ignore", category=FutureWarning)
            src = io.BytesIO(source.model_bytes) if isinstance(source, VerifiedArtifact) else str(source)
            module = torch.jit.load(src, map_location=target).eval()
    elif fmt == "aotinductor":
        module = load_pt2(source, static_batch_models, dev.index if dev.is_cuda else -1)
    else:
        raise BundleError(f"unknown artifact format {fmt!r}")

    def run_torch(x: torch.Tensor) -> torch.Tensor:
        with torch_threads(threads), torch.inference_mode():
            out = module(x.to(target, non_blocking=True).contiguous())
            return out if keep_on_device else out.cpu()

    return run_torch
