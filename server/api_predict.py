"""POST /predict: multipart file field(s), a raw image body, or JSON with base64 images."""
from __future__ import annotations

import base64
import binascii

from flask import Blueprint, current_app, g, jsonify, request

from .errors import APIError
from .fastpath import OPTIONS, RAW_TYPES, read_raw_body

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
    if ctype == "multipart/form-data":
        images = [(f.filename or f"{field}[{i}]", f.read())
                  for field in request.files for i, f in enumerate(request.files.getlist(field))]
        if not images:
            raise APIError(400, "multipart request without a file field; send the image as -F file=@photo.jpg")
        opts.update({k: request.form[k] for k in OPTIONS if k in request.form})
        return images, opts
    if ctype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise APIError(400, "body is not a JSON object; send {\"images\": [\"<base64>\", ...]}")
        raw = body.get("images", [body["image"]] if "image" in body else None)
        if not isinstance(raw, list):
            raise APIError(400, "JSON body needs \"images\": a list of base64 strings (or \"image\": one)")
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
