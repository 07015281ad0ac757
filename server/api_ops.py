"""Operations: GET /metrics (Prometheus text format) and GET /healthz."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

bp = Blueprint("ops", __name__)


@bp.get("/metrics")
def metrics():
    return Response(current_app.extensions["inference"].metrics.render(), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/models")
def models():
    svc = current_app.extensions["inference"]
    return jsonify({"default": svc.models.default, "models": [m.describe() for m in svc.models],
                    "mode": "redis" if svc.cfg.redis_url else "embedded", "decode_memory": svc.budget.describe()})
