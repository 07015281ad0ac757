#!/usr/bin/env bash
# The main job end to end on the digits demo: set up, write the dataset, train + evaluate, export a
# verified bundle (TorchScript, ONNX, .pt2), classify images with the C++ binary (.venv/bin/classify), then
# start the HTTP server in embedded mode, send it an image with the client and print the answer.
#   bash scripts/demo.sh        (idempotent: re-running starts the demo run over)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python

echo; echo "== 1/4 data: scikit-learn's handwritten digits as PNG class folders"
$PY -m trainer demo-data --out data/digits

echo; echo "== 2/4 train + evaluate: resnet18 at 32 px (configs/digits.yaml)"
$PY -m trainer train --config configs/digits.yaml --out runs/digits --overwrite

echo; echo "== 3/4 export: verified bundle in bundles/digits"
$PY -m export --checkpoint runs/digits/best.pt --format all --data data/digits --out bundles/digits --name digits --force
$PY -m export inspect bundles/digits

echo; echo "== 4/4 serve: the C++ classify binary, then the HTTP server (embedded mode) and its client"
images=$(ls data/digits/val/3/*.png | head -2; ls data/digits/val/8/*.png | head -1)
.venv/bin/classify --bundle bundles/digits --topk 2 $images   # installed by setup.sh
bash scripts/serve_demo.sh bundles/digits "$(ls data/digits/val/7/*.png | head -1)"
