"""A Triton Inference Server model repository from a bundle's ONNX model.

    python -m export triton bundles/digits --out models                 # models/digits/...
    python -m export triton bundles/digits --out models --device cuda --int8 --name digits-int8
    tritonserver --model-repository=models

Library form: ``write_triton_model(TritonOptions(bundle="bundles/digits", repository="models"))``.
Writes one model folder (other models already in the repository are left alone):

    models/digits/config.pbtxt     platform onnxruntime_onnx, max_batch_size from the manifest,
                                   dynamic batching, input/output names, types and shapes, instances
    models/digits/1/model.onnx     the bundle's file byte for byte (+ model.onnx.data), sha256 checked
    models/digits/labels.txt       one class per line, in output order
    models/digits/manifest.json    the bundle's manifest: clients read "preprocessing" from it

The model takes what every bundle artifact takes: uint8 RGB (N, 3, H, W), already resized and cropped
(the client does that, as the manifest says); it returns softmax probabilities (N, K). TTA and
ensemble fusion are not part of the ONNX graph, so an ensemble bundle is refused (serve its members).
config.pbtxt is written as text here (no protobuf dependency at export); the tests parse it with
Triton's own ``model_config_pb2`` from tritonclient.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .devices import parse_device
from .manifest import BundleError, check_artifact, manifest_path, read_manifest
from .onnx_metadata import metadata_mismatches

MODEL_VERSION = "1"
LABELS_FILE = "labels.txt"
DEFAULT_QUEUE_DELAY_US = 2000  # the HTTP server's --max-delay-ms 2 (server/config.py)
# Triton model names are folder names and URL path segments (/v2/models/NAME/infer)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_TRITON_DTYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}
_ONNX_DTYPES = {2: "uint8", 1: "float32"}  # onnx.TensorProto.UINT8 / FLOAT


@dataclass
class TritonOptions:
    bundle: str
    repository: str
    name: str | None = None  # default: the bundle's name
    int8: bool = False  # ship model.int8.onnx instead of model.onnx
    device: str = "cpu"  # cpu -> KIND_CPU; cuda -> KIND_GPU on every GPU; cuda:N -> KIND_GPU on GPU N
    instances: int = 1  # instance_group count (per GPU for KIND_GPU)
    preferred_batch_sizes: list[int] | None = None  # None: default_preferred_batch_sizes(max_batch)
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    threads: int | None = None  # onnxruntime intra-op threads per instance (None: the backend's default)
    force: bool = False  # replace an existing model folder of that name


def default_preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to max_batch, and max_batch itself: the batcher waits (up to the queue
    delay) for the next of these sizes instead of running every odd size that happens to be queued."""
    sizes, n = [], 4
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


def model_folder(opts: TritonOptions, manifest: dict) -> Path:
    """REPO/NAME after checking everything that can be checked before writing (CLI: before an export)."""
    name = opts.name or manifest["name"]
    if not _NAME.match(name):
        raise BundleError(f"Triton model name {name!r}: use letters, digits, '_', '-' and '.' (it becomes a folder "
                          "and a URL path segment); pass --name NAME")
    if opts.instances < 1:
        raise BundleError(f"--instances must be at least 1, got {opts.instances}")
    if opts.max_queue_delay_us < 0:
        raise BundleError(f"--max-queue-delay-us must be >= 0, got {opts.max_queue_delay_us}")
    if opts.threads is not None and opts.threads < 1:
        raise BundleError(f"--threads must be at least 1, got {opts.threads}")
    parse_device(opts.device)  # no GPU needed here: the repository may be written for another machine
    folder = Path(opts.repository) / name
    if folder.exists() and not opts.force:
        raise BundleError(f"'{folder}' already exists in the repository; pass --force to replace it, or --name to add "
                          "the model under another name")
    if folder.exists() and not (folder / "config.pbtxt").is_file():
        raise BundleError(f"'{folder}' exists and is not a Triton model folder (no config.pbtxt); refusing to replace "
                          "it: choose another --name or --out")
    return folder


def _check_model_bundle(manifest: dict, bundle, int8: bool) -> str:
    if manifest["kind"] == "ensemble":
        names = ", ".join(f"{bundle}/{m['path']}" for m in manifest["members"])
        raise BundleError(f"{bundle}: is an ensemble bundle; a Triton repository serves single ONNX models (the "
                          f"fusion and each member's preprocessing are not in a graph). Write one model per member "
                          f"instead: python -m export triton MEMBER --out REPO, for each of {names}")
    key = "onnx_int8" if int8 else "onnx"
    if key not in manifest["artifacts"]:
        fix = ("--quantize int8 --calibration DIR" if int8 else "--format onnx")
        raise BundleError(f"{bundle}: the bundle has no '{key}' artifact (it has: {', '.join(manifest['artifacts'])}); "
                          f"Triton's onnxruntime backend serves ONNX: re-export with {fix}")
    bad = [c for c in manifest["classes"] if not c.strip() or "\n" in c or "\r" in c]
    if bad:
        raise BundleError(f"{bundle}: class names {bad!r} cannot be lines of {LABELS_FILE}; rename those classes")
    return key


def preferred_sizes(opts: TritonOptions, max_batch: int) -> list[int]:
    if opts.preferred_batch_sizes is None:
        return default_preferred_batch_sizes(max_batch)
    sizes = sorted(set(opts.preferred_batch_sizes))
    bad = [n for n in sizes if not 1 <= n <= max_batch]
    if bad:
        raise BundleError(f"--preferred-batch-sizes {bad}: each must be between 1 and the bundle's max_batch "
                          f"{max_batch} (re-export with a larger --max-batch for more)")
    return sizes


def _check_onnx_signature(path: Path, manifest: dict) -> None:
    """Refuse a model whose declared input/output disagree with the manifest: Triton would refuse to load it."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for want, got in ((manifest["input"], graph.input), (manifest["output"], graph.output)):
        values = {v.name: v for v in got}
        value = values.get(want["name"])
        tensor = value.type.tensor_type if value is not None else None
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim] if tensor else None
        expected = [-1, *want["shape"][1:]]
        dtype = _ONNX_DTYPES.get(tensor.elem_type, "another type") if tensor else None
        if tensor is None or dtype != want["dtype"] or dims != expected:
            raise BundleError(f"{path}: declares {want['name']!r} as {dims} {dtype}, the manifest says {expected} "
                              f"{want['dtype']}; the bundle is inconsistent (Triton would refuse it): re-export it")


def config_pbtxt(manifest: dict, name: str, opts: TritonOptions, artifact: dict) -> str:
    """Triton ModelConfig in protobuf text format (the config.pbtxt of model_config.proto)."""
    inp, out = manifest["input"], manifest["output"]
    def dims(shape: list[int]) -> str:  # without the batch dimension: max_batch_size stands for it
        return ", ".join(str(d) for d in shape[1:])

    device = parse_device(opts.device)
    group = [f"    count: {opts.instances}", f"    kind: {'KIND_GPU' if device.is_cuda else 'KIND_CPU'}"]
    if device.is_cuda and ":" in opts.device:
        group.append(f"    gpus: [ {device.index} ]")
    sizes = ", ".join(str(n) for n in preferred_sizes(opts, manifest["max_batch"]))
    lines = [
        f"# Written by 'python -m export triton' from bundle '{manifest['name']}' version {manifest['version']},",
        f"# {artifact['file']} sha256 {artifact['sha256']}.",
        f"# Input: uint8 RGB, resized and cropped as manifest.json's \"preprocessing\" says; output: probabilities.",
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {manifest['max_batch']}",
        "version_policy: { latest: { num_versions: 1 } }",
        "input [",
        "  {",
        f'    name: "{inp["name"]}"',
        f"    data_type: {_TRITON_DTYPES[inp['dtype']]}",
        f"    dims: [ {dims(inp['shape'])} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{out["name"]}"',
        f"    data_type: {_TRITON_DTYPES[out.get('dtype', 'float32')]}",
        f"    dims: [ {dims(out['shape'])} ]",
        f'    label_filename: "{LABELS_FILE}"',
        "  }",
        "]",
        "dynamic_batching {",
        *([f"  preferred_batch_size: [ {sizes} ]"] if sizes else []),
        f"  max_queue_delay_microseconds: {opts.max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        *group,
        "  }",
        "]",
        # one zero batch at load time: the first real request does not pay onnxruntime's session warm-up
        "model_warmup [",
        "  {",
        '    name: "zeros"',
        "    batch_size: 1",
        "    inputs: {",
        f'      key: "{inp["name"]}"',
        "      value: {",
        f"        data_type: {_TRITON_DTYPES[inp['dtype']]}",
        f"        dims: [ {dims(inp['shape'])} ]",
        "        zero_data: true",
        "      }",
        "    }",
        "  }",
        "]",
    ]
    if opts.threads:
        lines += ['parameters: { key: "intra_op_thread_count" value: { string_value: "%d" } }' % opts.threads,
                  'parameters: { key: "inter_op_thread_count" value: { string_value: "1" } }']
    return "\n".join(lines) + "\n"


def write_triton_model(opts: TritonOptions, say=print) -> Path:
    """Write REPO/NAME from the bundle; returns the model folder. Raises BundleError with the fix."""
    from .build import staged_bundle  # the same write-then-rename as a bundle

    manifest = read_manifest(opts.bundle)
    key = _check_model_bundle(manifest, opts.bundle, opts.int8)
    folder = model_folder(opts, manifest).resolve()
    sizes = preferred_sizes(opts, manifest["max_batch"])  # refused before anything is copied
    src = manifest_path(opts.bundle).parent
    art = manifest["artifacts"][key]
    files = [art["file"], *art.get("data_files", [])]
    missing = [f for f in files if not (src / f).is_file()]
    if missing:
        raise BundleError(f"{src}: {missing} missing; the bundle is incomplete: copy it again or re-export it")
    with staged_bundle(folder) as tmp:
        version = tmp / MODEL_VERSION
        version.mkdir()
        for f in files:
            # Triton's onnxruntime backend opens 1/model.onnx; the external data keeps its name next to it
            shutil.copyfile(src / f, version / ("model.onnx" if f == art["file"] else f))
        # the copies are what Triton will load: check their sha256, not the originals'
        check_artifact(version, {"artifacts": {key: {**art, "file": "model.onnx"}}}, key)
        _check_onnx_signature(version / "model.onnx", manifest)
        bad = metadata_mismatches(version / "model.onnx", manifest)
        if bad:  # labels.txt and the clients' preprocessing come from the manifest: it must be the exported one
            raise BundleError(f"{src / art['file']}: its metadata {bad} differ from {manifest_path(src)}; the manifest "
                              "was edited after export: restore it or re-export the bundle")
        (tmp / LABELS_FILE).write_text("".join(f"{c}\n" for c in manifest["classes"]), encoding="utf-8")
        shutil.copyfile(manifest_path(src), tmp / "manifest.json")
        (tmp / "config.pbtxt").write_text(config_pbtxt(manifest, folder.name, opts, art), encoding="utf-8")
    say(f"triton: {folder} ({art['file']}, max_batch_size {manifest['max_batch']}, preferred batch sizes {sizes}); "
        f"serve with: tritonserver --model-repository={folder.parent}")
    return folder
