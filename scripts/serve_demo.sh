#!/usr/bin/env bash
# Serve a bundle in embedded mode, classify one image with the client, print the answer, stop.
#   bash scripts/serve_demo.sh [BUNDLE] [IMAGE]      (defaults: bundles/digits, a digits validation image)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUNDLE=${1:-bundles/digits}
IMAGE=${2:-$(ls data/digits/val/7/*.png | head -1)}
PORT=${PORT:-8000}
URL="http://127.0.0.1:$PORT"
$PY -m server --bundle "$BUNDLE" --port "$PORT" --log-level WARNING &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
$PY - "$URL" <<'PY'
import sys, time
from server.client import Client
c, deadline = Client(sys.argv[1]), time.time() + 120
while not c.ready():
    if time.time() > deadline:
        sys.exit(f"server at {sys.argv[1]} did not become ready")
    time.sleep(0.3)
PY
$PY -m server.client --url "$URL" "$IMAGE" --tta hflip
