#!/usr/bin/env bash
# The GPU latency receipt, sized to finish within 8 minutes on one H100/H200 (benchmarks/gpu_ladder.py):
# LlamaGen-B 32x32, batch 1 with CFG, every method eager and compiled (kernels per step, host us per step,
# launch floor), then raster vs FlashAR compiled on an Emu3.5-34B-shaped stack and LlamaGen GPT-L..GPT-3B.
# Extra arguments go to gpu_ladder.py (e.g. --attention math, --coordinate-descent, --buckets 4).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/latency_gpu.json}"
shift || true
"${PYTHON:-python}" benchmarks/gpu_ladder.py --out "$out" --budget-s 420 "$@"
