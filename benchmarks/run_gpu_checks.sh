#!/usr/bin/env bash
# One device call: build the CUDA ops once, run every `gpu` test, then the inference benchmark.
# Usage (device tool): bash benchmarks/run_gpu_checks.sh  -> logs and JSON under $OUT
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m retinaflow.ops.build 2>&1 | tail -1
python -m pytest -q -p no:cacheprovider -m gpu \
  tests/ops tests/model tests/engine/test_infer.py tests/data/test_loader.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python benchmarks/bench_infer.py --batches 1 8 2>&1 | tee "$OUT/infer.json"
