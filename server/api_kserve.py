"""KServe v2 / Triton inference protocol (HTTP/REST, with the binary tensor data extension).

Each model takes one input named ``images``: either ``UINT8 [N, 3, H, W]`` pixels already resized
and cropped as the manifest says, or ``BYTES [N]`` encoded images (decoded and preprocessed here,
with the request parameter ``tta`` for test-time augmentation). The output ``probs`` is
``FP32 [N, K]`` softmax probabilities; ``model_metadata.parameters.classes`` names the columns.
"""
from __future__ import annotations

import base64
import json
import math
import struct

import numpy as np
from flask import Blueprint, Response, current_app, g, jsonify, request

from .errors import APIError
from .front import AUTHORIZED
from .jsonbody import parse_json_body
from .limits import check_image_count

bp = Blueprint("kserve", __name__, url_prefix="/v2")

NP_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
            "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
            "FP32": np.float32, "FP64": np.float64}


def _svc():
    return current_app.extensions["inference"]


@bp.get("")
def server_metadata():
    return jsonify({"name": "shipclassifier", "version": "0.1.0", "extensions": ["binary_tensor_data"]})


@bp.get("/health/live")
def live():
    return jsonify({"live": True})


@bp.get("/health/ready")
def ready():
    """Open to probes without a key, so an unauthenticated answer is the status alone: the model
    names and the reasons (a Redis host, worker counts) go only to a caller the front layer
    authorized (a valid key, or no keys configured); /v2/models/NAME/ready is behind the key."""
    svc = _svc()
    states = {m.name: svc.dispatcher.ready(m.name) for m in svc.models}
    ok = all(s for s, _ in states.values())
    body = {"ready": ok, "reason": "every model is ready" if ok else
            "a model is not ready (the reasons: this route or /v2/models/NAME/ready with an API key)"}
    if request.environ.get(AUTHORIZED):
        body["models"] = {n: {"ready": s, "reason": r} for n, (s, r) in states.items()}
    return jsonify(body), 200 if ok else 503


def _model(name: str, version: str | None):
    """The served model ``name``; with a ``versions/V`` route, only when V is the loaded version."""
    m = _svc().models.get(name)
    if version is not None and version != m.version:
        raise APIError(404, f"model {m.name!r} has no version {version!r}; the one served is {m.version!r} "
                            f"(or leave out /versions/V)")
    return m


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None):
    m = _model(name, version)
    ch, cw = m.spec.crop_size
    return jsonify({"name": m.name, "versions": [m.version], "platform": f"shipclassifier_{m.kind}",
                    "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, ch, cw]}],
                    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, len(m.classes)]}],
                    "parameters": {"classes": m.classes, "tta_default": m.tta_default,
                                   "alternative_input": "images as BYTES [N] of encoded image files",
                                   "execution": _svc().execution(m)}})


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None):
    m = _model(name, version)
    ok, reason = _svc().dispatcher.ready(m.name)
    return jsonify({"name": m.name, "ready": ok, "reason": reason}), 200 if ok else 503


def _object(value, what: str) -> dict:
    """An optional JSON object of the request (absent: {}); anything else is the client's mistake."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError(400, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _binary_size(params: dict) -> int | None:
    size = params.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise APIError(400, f"input 'images' parameters.binary_data_size must be a non-negative integer, got {size!r}")
    return size


def _read_request() -> tuple[dict, bytes]:
    body = request.get_data(cache=False)
    hlen = request.headers.get("Inference-Header-Content-Length")
    if hlen is not None:
        try:
            n = int(hlen)
        except ValueError:
            raise APIError(400, f"Inference-Header-Content-Length must be an integer, got {hlen!r}") from None
        if not 0 < n <= len(body):
            raise APIError(400, f"Inference-Header-Content-Length {n} does not fit a {len(body)}-byte body")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    req = parse_json_body(head, "inference request header")
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise APIError(400, "inference request needs \"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]")
    return req, binary


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The ``count`` elements (already within --max-images) of binary BYTES data; never more are read."""
    out, off = [], 0
    while off < len(raw) and len(out) < count:
        if off + 4 > len(raw):
            raise APIError(400, "BYTES tensor data is truncated (each element is a 4-byte length then its bytes)")
        (n,) = struct.unpack_from("<I", raw, off)
        if off + 4 + n > len(raw):
            raise APIError(400, f"BYTES element {len(out)} declares {n} bytes; only {len(raw) - off - 4} follow")
        out.append(raw[off + 4:off + 4 + n])
        off += 4 + n
    if len(out) < count:
        raise APIError(400, f"BYTES tensor holds {len(out)} elements, shape says {count}")
    if off != len(raw):
        raise APIError(400, f"BYTES tensor holds more than the {count} elements its shape says")
    return out


def _input_tensor(inp, binary: bytes, offset: int, model, limits) -> tuple[np.ndarray | list[bytes], int]:
    """The input ``images`` -> (UINT8 pixels or encoded images, offset after its binary data). The
    declared shape is checked (--max-images, the model's crop) before any element is read or built."""
    inp = _object(inp, "each of \"inputs\"")
    name, dtype, shape = inp.get("name"), inp.get("datatype"), inp.get("shape")
    if name != "images":
        raise APIError(400, f"unknown input {name!r}; this model has one input named 'images'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise APIError(400, f"input 'images' shape must be a list of non-negative integers, got {_short(shape)}")
    if dtype not in ("BYTES", "UINT8"):
        raise APIError(400, f"input 'images' has datatype {_short(dtype)}; send UINT8 [N, 3, H, W] pixels or BYTES "
                            "[N] encoded images")
    ch, cw = model.spec.crop_size
    if dtype == "BYTES" and len(shape) != 1:
        raise APIError(400, f"BYTES input 'images' must have shape [N] (one encoded image each), got {_short(shape)}")
    if dtype == "UINT8" and (len(shape) != 4 or shape[1:] != [3, ch, cw]):
        raise APIError(400, f"input tensor has shape {_short(shape)}; model {model.name!r} takes [N, 3, {ch}, {cw}] "
                            "uint8 (resized and cropped as its manifest says)")
    check_image_count(shape[0], limits)   # a declared [10000000] is refused before anything is built
    count = math.prod(shape)
    size = _binary_size(_object(inp.get("parameters"), "input 'images' parameters"))
    if size is not None:
        raw = binary[offset:offset + size]
        if len(raw) != size:
            raise APIError(400, f"binary data for 'images' is {len(raw)} bytes, binary_data_size says {size}")
        offset += size
    if dtype == "BYTES":
        if size is not None:
            return _bytes_elements(raw, count), offset
        data = inp.get("data")
        if not isinstance(data, list) or len(data) != count or not all(isinstance(d, str) for d in data):
            raise APIError(400, f"BYTES input 'images' needs {count} base64 strings in \"data\"")
        try:
            return [base64.b64decode(d, validate=True) for d in data], offset
        except ValueError as exc:
            raise APIError(400, f"BYTES input 'images': invalid base64 ({exc})") from exc
    if size is not None:
        if len(raw) != count:
            raise APIError(400, f"UINT8 input 'images' has {len(raw)} bytes for shape {shape}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape), offset
    data = inp.get("data")
    # flat (count values) or nested by the shape (shape[0] lists): anything longer is refused unread
    if not isinstance(data, list) or len(data) > count:
        got = f"{len(data)} values" if isinstance(data, list) else type(data).__name__
        raise APIError(400, f"input 'images' \"data\" must be a list of {count} integers for shape {shape}, got {got}")
    try:
        arr = np.asarray(data, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise APIError(400, f"input 'images' \"data\" is not a list of integers ({exc})") from exc
    if arr.size != count:
        raise APIError(400, f"input 'images' has {arr.size} values for shape {shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise APIError(400, "UINT8 input 'images' has values outside 0..255")
    return arr.astype(np.uint8).reshape(shape), offset


def _short(value, limit: int = 80) -> str:
    """repr of a client's value for an error message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None):
    svc = _svc()
    m = _model(name, version)
    req, binary = _read_request()
    if len(req["inputs"]) != 1:
        raise APIError(400, f"{len(req['inputs'])} inputs given; this model has one input named 'images'")
    params = _object(req.get("parameters"), "request \"parameters\"")
    # the outputs asked for are checked before the work, not after it
    wanted = req.get("outputs") or [{"name": "probs"}]
    if not isinstance(wanted, list):
        raise APIError(400, f"\"outputs\" must be a list of {{\"name\": \"probs\"}} objects, got {type(wanted).__name__}")
    wanted = [_object(o, "each of \"outputs\"") for o in wanted]
    for o in wanted:
        if o.get("name") != "probs":
            raise APIError(400, f"unknown output {_short(o.get('name'))}; this model has one output named 'probs'")
    binary_out = bool(params.get("binary_data_output")) or any(
        _object(o.get("parameters"), "output parameters").get("binary_data") for o in wanted)
    x, _ = _input_tensor(req["inputs"][0], binary, 0, m, svc.request_limits)
    if isinstance(x, list):
        probs = svc.probs_for_images(m, [(f"images[{i}]", b) for i, b in enumerate(x)], params.get("tta"),
                                     arrival=g.get("arrival"))
    else:
        probs = svc.probs_for_tensor(m, x, arrival=g.get("arrival"))
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    out = {"name": "probs", "datatype": "FP32", "shape": list(probs.shape)}
    resp = {"model_name": m.name, "model_version": m.version, "outputs": [out]}
    if "id" in req:
        resp["id"] = req["id"]
    if not binary_out:
        out["data"] = probs.reshape(-1).tolist()
        return jsonify(resp)
    out["parameters"] = {"binary_data_size": probs.nbytes}
    head = json.dumps(resp).encode()
    r = Response(head + probs.tobytes(), mimetype="application/octet-stream")
    r.headers["Inference-Header-Content-Length"] = str(len(head))
    return r
