"""Operations: GET /metrics (Prometheus text format), GET /models and GET /healthz (liveness)."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness under the name Kubernetes users expect, open like /v2/health/live (no key, no model
    state: a live process answers 200 even while it drains or waits for a worker)."""
    return jsonify({"live": True})


@bp.get("/metrics")
def metrics():
    return Response(current_app.extensions["inference"].metrics.render(), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/models")
def models():
    svc = current_app.extensions["inference"]
    return jsonify({"default": svc.models.default, "models": [m.describe() for m in svc.models],
                    "mode": "redis" if svc.cfg.redis_url else "embedded"})
