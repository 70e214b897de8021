#!/usr/bin/env bash
# Issue 2 and 3 benchmarks on the GPU machine, one call: build the CUDA ops, training throughput
# (with torch.compile), end-to-end latency/throughput under CUDA graphs, and the inference comparison.
# Usage (device tool): bash benchmarks/run_issue2.sh [bench_train args]  -> JSON under $OUT
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST=9.0
python -m retinaflow.ops.build 2>&1 | tail -2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 150 python benchmarks/bench_e2e_latency.py 2>&1 | tee "$OUT/e2e.json"
timeout 90 python benchmarks/bench_infer.py --batches 1 8 2>&1 | tee "$OUT/infer.json"
timeout 300 python benchmarks/bench_train.py --batch 8 --precision bf16 --compile "$@" 2>&1 | tee "$OUT/train.json"
