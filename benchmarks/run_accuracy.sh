#!/usr/bin/env bash
# One device call: build the CUDA ops once, then the real-image accuracy benchmark (retinaflow vs
# torchvision, 3 seeds each; extra arguments go to bench_accuracy.py, e.g. --gpus 0,1 or --recipe ...).
# Usage (device tool): bash benchmarks/run_accuracy.sh [args]  -> data, logs, runs.jsonl, summary.json under $OUT
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m retinaflow.ops.build 2>&1 | tail -1
python benchmarks/bench_accuracy.py --out "$OUT/accuracy" --data /tmp/real_data "$@" 2>&1 | tee "$OUT/accuracy.log" | tail -120
rm -rf "$OUT"/accuracy/*/model.pth
