#!/usr/bin/env bash
# CUDA checks, for a machine with a GPU and a torch install (no setup: uses the python3 there).
#   bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/python:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/trainer/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
python3 -m trainer demo-data --out data/digits
python3 -m trainer train --config configs/digits.yaml --device cuda --workers 4 --out runs/gpu 2>&1 | tee "$OUT/gpu_train.log"
python3 -m trainer train --config configs/digits.yaml --device cuda --amp fp16 --epochs 3 --workers 4 --out runs/gpu16 2>&1 | tail -4 | tee -a "$OUT/gpu_train.log"
