#!/usr/bin/env bash
# Issue 15 in one device call: build the CUDA ops once, run the engine `gpu` tests (CUDA .pt2, C++ runner),
# then the engine benchmark. Usage (device tool): bash benchmarks/run_engine_checks.sh  -> logs, JSON in $OUT
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m retinaflow.ops.build 2>&1 | tail -1
python -m pytest -q -p no:cacheprovider -m gpu -rs --durations=5 tests/export tests/deploy \
  2>&1 | tee "$OUT/engine_gpu_tests.log" | tail -25
timeout 400 python benchmarks/bench_engine.py --keep /tmp/bench_engine 2>&1 | tee "$OUT/engine.json" | tail -40
