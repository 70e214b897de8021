#!/usr/bin/env bash
# Issue 2 benchmarks on the GPU machine, one call: training throughput and inference latency/throughput.
# Usage (device tool): bash benchmarks/run_issue2.sh   -> JSON lines in $OUT/issue2.jsonl
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST=9.0
python -m retinaflow.ops.build 2>&1 | tail -2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python benchmarks/bench_train.py --batch 8 --precision bf16 "$@" 2>&1 | tee "$OUT/train.json"
python benchmarks/bench_infer.py --batches 1 8 2>&1 | tee "$OUT/infer.json"
