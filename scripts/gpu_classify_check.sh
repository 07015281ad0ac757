#!/usr/bin/env bash
# Part of scripts/gpu_check.sh: the classify binary on CUDA gives the CPU's top-1, and its latency on both.
#   CLASSIFY_BIN=build-gpu/bin/classify BUNDLE=bundles/gpu-digits OUT=/tmp/gpu_check PY=python3 \
#       bash scripts/gpu_classify_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
imgs=$(ls data/digits/val/*/*.png | head -32)
"$CLASSIFY_BIN" --bundle "$BUNDLE" --device cuda --topk 1 $imgs > "$OUT/classify_cuda.jsonl"
"$CLASSIFY_BIN" --bundle "$BUNDLE" --device cpu --topk 1 $imgs > "$OUT/classify_cpu.jsonl"
"$PY" - "$OUT/classify_cuda.jsonl" "$OUT/classify_cpu.jsonl" <<'PY'
import json, sys
gpu, cpu = ([json.loads(line)["topk"][0]["index"] for line in open(f)] for f in sys.argv[1:3])
print(f"classify --device cuda: top-1 agrees with --device cpu on {sum(a == b for a, b in zip(gpu, cpu))} of {len(cpu)}")
assert gpu == cpu
PY
"$CLASSIFY_BIN" --bundle "$BUNDLE" --device cuda --precision fp16 --topk 1 $imgs > "$OUT/classify_cuda_fp16.jsonl"
for dev in cuda cpu; do
  for b in 1 64; do
    "$CLASSIFY_BIN" --bundle "$BUNDLE" --device "$dev" --bench 50 --batch "$b" --threads "$(nproc)"
  done
done
