#!/usr/bin/env bash
# The GPU check, as one command on a machine with a CUDA GPU (about 8 minutes on an H200):
#   bash scripts/gpu_check.sh [OUT_DIR]            (default: $OUT, else /tmp/gpu_check)
#   GPU_CHECK_BENCH=0 bash scripts/gpu_check.sh    (skip the GPU-vs-CPU figures: about 4 minutes)
# Trainer on CUDA, pytest -m gpu (export, loader, C++ runtime), a digits bundle exported with CUDA
# artifacts, the classify binary on CUDA, the embedded server and a Redis GPU worker
# (scripts/gpu_serve_check.py), then benchmarks/backends.py and benchmarks/native.py with --device cuda.
# No set-up and no downloads: uses $PY (default .venv/bin/python when present, else python3) with torch,
# onnxruntime-gpu and this project's dependencies already installed; builds the native runtime into
# build-gpu/ when cmake can. Every step writes OUT/<step>.log; OUT/summary.txt says PASS, FAIL or SKIP
# per step with its time; the exit status is 1 when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python; else PY=$(command -v python3); fi
fi
export PY PYTHONPATH=$PWD/python:$PWD PYTHONUNBUFFERED=1
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0
T0=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, record the verdict
  local name=$1 limit=$2 t=$SECONDS rc verdict=PASS
  shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then verdict="FAIL (exit $rc$([ $rc = 124 ] && echo ", over ${limit}s"))"; FAILED=1; fi
  printf '%-22s %-24s %4ds\n' "$name" "$verdict" $((SECONDS - t)) | tee -a "$SUMMARY"
  tail -n 4 "$OUT/$name.log"
  return $rc
}
skip() { printf '%-22s SKIP: %s\n' "$1" "$2" | tee -a "$SUMMARY"; }

# 1. what this machine is
step environment 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, torchvision, onnxruntime as ort
print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"cuda\", torch.version.cuda,
      \"available\", torch.cuda.is_available(), \"devices\", torch.cuda.device_count())
print(\"onnxruntime\", ort.__version__, ort.get_available_providers())
assert torch.cuda.is_available(), \"torch sees no CUDA device\""' || { echo "no usable GPU: stopping"; exit 1; }
cp "$OUT/environment.log" "$OUT/gpu.txt"

# 2. the native runtime, built here against this machine's torch (links torch_cuda)
CLASSIFY_BIN=${CLASSIFY_BIN:-}
if [ -z "$CLASSIFY_BIN" ]; then
  if command -v cmake >/dev/null && step native_build 300 bash -c \
      'cmake -S . -B build-gpu -DPython_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release && cmake --build build-gpu -j "$(nproc)"'; then
    CLASSIFY_BIN=$PWD/build-gpu/bin/classify
  else
    command -v cmake >/dev/null || skip native_build "cmake not installed: the C++ runtime steps skip"
  fi
fi
export CLASSIFY_BIN

# 3. the GPU tests: trainer, export + loader on CUDA, the C++ runtime against Python on CUDA
step pytest_gpu 420 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/trainer/test_gpu.py \
    tests/export/test_cuda.py tests/native/test_devices.py

# 4. the trainer's commands on CUDA (digits demo data)
step trainer 240 bash -c '
  set -e
  "$PY" -m trainer demo-data --out data/digits
  "$PY" -m trainer train --config configs/digits.yaml --device cuda --workers 4 --out runs/gpu --overwrite
  "$PY" -m trainer train --config configs/digits.yaml --device cuda --amp fp16 --epochs 3 --workers 4 --out runs/gpu16 --overwrite
  "$PY" -m trainer predict --checkpoint runs/gpu/best.pt --images data/digits/val --out runs/gpu/preds.csv \
      --tta multiscale:32,36 --device cuda --save-probs
  "$PY" -m trainer evaluate --checkpoint runs/gpu/best.pt runs/gpu16/best.pt --data data/digits --device cuda \
      --tta multiscale:32,36
  "$PY" -m trainer distill --data data/digits --img-size 32 --crop-pct 1.0 --hflip 0 --epochs 3 --batch-size 128 \
      --workers 4 --device cuda --model mobilenet_v2 --lr 0.05 --teacher runs/gpu/best.pt --out runs/gpu_kd --overwrite
  "$PY" -m trainer features --checkpoint runs/gpu/best.pt --data data/digits --classifier logreg --device cuda \
      --out runs/gpu/logreg.joblib
  "$PY" -m trainer visualize --checkpoint runs/gpu/best.pt --image "$(ls data/digits/val/3/*.png | head -1)" \
      --layers layer1,layer2 --out runs/gpu/vis'

# 5. a real bundle with CUDA artifacts (fp32 + fp16, checked on the 359 validation images)
export BUNDLE=bundles/gpu-digits OUT
step export 300 "$PY" -m export --checkpoint runs/gpu/best.pt --format all --data data/digits --out "$BUNDLE" \
    --device cuda --precision fp32 fp16 --force
step export_inspect 60 "$PY" -m export inspect "$BUNDLE"

# 6. the classify binary on CUDA against the CPU, and its latency on both
if [ -n "$CLASSIFY_BIN" ] && [ -x "$CLASSIFY_BIN" ]; then
  step classify_cuda 120 bash scripts/gpu_classify_check.sh
else
  skip classify_cuda "no classify binary (native_build failed or skipped)"
fi

# 7. the service on the GPU: embedded server and a Redis GPU worker (python -m server[.worker] --device cuda)
step serve 300 "$PY" scripts/gpu_serve_check.py --bundle "$BUNDLE" --images data/digits/val --device cuda \
    --out "$OUT/serve"

# 8. GPU against CPU figures (images/s at batch 1 and the best batch), same machine, same run
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  step bench_backends 420 "$PY" benchmarks/backends.py --device cuda --models resnet50 mobilenet_v3_large \
      --batches 1 8 64 --precisions fp32 fp16 --threads "$(nproc)" --calibration data/digits/train \
      --calibration-count 32 --quick --out "$OUT/bench" --work runs/gpu_bench
  if [ -n "$CLASSIFY_BIN" ] && [ -f runs/gpu_bench/resnet50/manifest.json ]; then  # reuses its resnet50 bundle
    step bench_native 300 "$PY" benchmarks/native.py --bundle runs/gpu_bench/resnet50 --device cuda \
        --threads "$(nproc)" --batch 1 --repeat 10 --work runs/gpu_native --out "$OUT/bench/native.json"
  fi
else
  skip bench_backends "GPU_CHECK_BENCH=0"
fi

printf 'total %ds\n' $((SECONDS - T0)) | tee -a "$SUMMARY"
exit $FAILED
