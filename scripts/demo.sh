#!/usr/bin/env bash
# The main job end to end on the digits demo: set up, write the dataset, train, evaluate.
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY -m trainer demo-data --out data/digits
$PY -m trainer train --config configs/digits.yaml --out runs/digits --overwrite
