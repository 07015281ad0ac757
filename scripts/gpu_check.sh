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
python3 -m trainer train --config configs/digits.yaml --device cuda --workers 4 --out runs/gpu --overwrite 2>&1 | tee "$OUT/gpu_train.log"
python3 -m trainer train --config configs/digits.yaml --device cuda --amp fp16 --epochs 3 --workers 4 --out runs/gpu16 --overwrite 2>&1 | tail -4 | tee -a "$OUT/gpu_train.log"
# the trainer's other commands on CUDA, on the digits model trained above
R="--data data/digits --img-size 32 --crop-pct 1.0 --hflip 0 --epochs 3 --batch-size 128 --workers 4 --device cuda"
python3 -m trainer predict --checkpoint runs/gpu/best.pt --images data/digits/val --out runs/gpu/preds.csv \
    --tta multiscale:32,36 --device cuda --save-probs 2>&1 | tail -2 | tee -a "$OUT/gpu_extras.log"
python3 -m trainer evaluate --checkpoint runs/gpu/best.pt runs/gpu16/best.pt --data data/digits --device cuda \
    --tta multiscale:32,36 2>&1 | tail -6 | tee -a "$OUT/gpu_extras.log"
python3 -m trainer distill $R --model mobilenet_v2 --lr 0.05 --teacher runs/gpu/best.pt --out runs/gpu_kd --overwrite \
    2>&1 | tail -3 | tee -a "$OUT/gpu_extras.log"
python3 -m trainer features --checkpoint runs/gpu/best.pt --data data/digits --classifier logreg --device cuda \
    --out runs/gpu/logreg.joblib 2>&1 | tail -3 | tee -a "$OUT/gpu_extras.log"
python3 -m trainer visualize --checkpoint runs/gpu/best.pt --image "$(ls data/digits/val/3/*.png | head -1)" \
    --layers layer1,layer2 --out runs/gpu/vis 2>&1 | tail -2 | tee -a "$OUT/gpu_extras.log"
