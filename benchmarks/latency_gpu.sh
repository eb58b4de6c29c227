#!/usr/bin/env bash
# The GPU latency table (bf16, CUDA graphs through torch.compile), sized to finish within 8 minutes on one
# H100/H200: LlamaGen-B, 32x32 and 16x16 grids, batch 1 with CFG, every method eager and compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/latency_gpu.json}"
"${PYTHON:-python}" benchmarks/latency.py --device cuda --dtypes bfloat16 --models GPT-B --grids 32,16 --batches 1 \
    --methods raster,flashar,flashar:buckets=4,zipar,sjd --compile eager,compiled --repeats 3 --out "$out"
