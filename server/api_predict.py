"""POST /predict: multipart file field(s), a raw image body, or JSON with base64 images."""
from __future__ import annotations

import base64
import binascii

from flask import Blueprint, current_app, g, jsonify, request

from .errors import APIError
from .fastpath import OPTIONS, RAW_TYPES, read_raw_body
from .jsonbody import parse_json_body
from .limits import check_image_count

bp = Blueprint("predict", __name__)


def _b64(value, name: str) -> bytes:
    if not isinstance(value, str):
        raise APIError(400, f"{name}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:   # a data URL from a browser
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"{name}: invalid base64 ({exc})") from exc


def parse_predict_request() -> tuple[list[tuple[str, bytes]], dict]:
    """-> ([(name, encoded bytes)], options {model, tta, topk})."""
    ctype = (request.mimetype or "").lower()
    opts = {k: request.args.get(k) for k in OPTIONS if request.args.get(k) is not None}
    limits = current_app.extensions["inference"].request_limits
    if ctype == "multipart/form-data":
        files = [(field, i, f) for field in request.files for i, f in enumerate(request.files.getlist(field))]
        if not files:
            raise APIError(400, "multipart request without a file field; send the image as -F file=@photo.jpg")
        check_image_count(len(files), limits)   # before any file is read into memory
        images = [(f.filename or f"{field}[{i}]", f.read()) for field, i, f in files]
        opts.update({k: request.form[k] for k in OPTIONS if k in request.form})
        return images, opts
    if ctype == "application/json":
        body = parse_json_body(request.get_data(cache=False), "JSON body",
                               "; send {\"images\": [\"<base64>\", ...]}")
        if not isinstance(body, dict):
            raise APIError(400, "body is not a JSON object; send {\"images\": [\"<base64>\", ...]}")
        raw = body.get("images", [body["image"]] if "image" in body else None)
        if not isinstance(raw, list):
            raise APIError(400, "JSON body needs \"images\": a list of base64 strings (or \"image\": one)")
        check_image_count(len(raw), limits)   # before a million "" become a million names and buffers
        images = [(f"images[{i}]", _b64(v, f"images[{i}]")) for i, v in enumerate(raw)]
        opts.update({k: body[k] for k in OPTIONS if body.get(k) is not None})
        return images, opts
    if ctype.startswith(RAW_TYPES):
        return [("body", read_raw_body(request.environ, current_app.config["MAX_CONTENT_LENGTH"]))], opts
    raise APIError(415, f"unsupported Content-Type {ctype or '(none)'!r}; send multipart/form-data, "
                        "application/json with base64, or a raw image/* body")


@bp.post("/predict")
def predict():
    images, opts = parse_predict_request()
    svc = current_app.extensions["inference"]
    body = svc.classify_images(images, opts.get("model"), opts.get("tta"), opts.get("topk", 5),
                               arrival=g.get("arrival"))
    return jsonify(body)
