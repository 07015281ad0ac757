"""GET /: a small page to classify an image in the browser (static HTML + fetch to /predict)."""
from __future__ import annotations

from flask import Blueprint, current_app

bp = Blueprint("page", __name__)


@bp.get("/")
def index():
    return current_app.send_static_file("index.html")
