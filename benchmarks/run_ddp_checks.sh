#!/usr/bin/env bash
# One device call on a 2-GPU machine: DDP fault handling on real NCCL and the pipeline's train step on 2 GPUs
# (the `gpu` tests of tests/engine/test_distributed*.py and tests/kubeflow/steps/test_training_ddp.py).
# Needs pycocotools (validation in two of the runs); no MLflow (tracking off), no pretrained weights.
# Usage (device tool, nvidia-h100-x2): bash benchmarks/run_ddp_checks.sh  -> logs under $OUT
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L 2>&1 | tee "$OUT/gpus.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda devices', torch.cuda.device_count())" \
  2>&1 | tee -a "$OUT/gpus.txt"
# -rA: passed tests' output too (the SIGTERM test prints the resumed-vs-uninterrupted weight difference,
# also in the JUnit XML as the property resume_max_abs_difference); --basetemp keeps each run's files.
python -m pytest -q -p no:cacheprovider -m gpu -rA --durations=0 \
  --junitxml="$OUT/ddp_checks.xml" --basetemp="$OUT/tmp" \
  tests/engine/test_distributed.py tests/engine/test_distributed_faults.py \
  tests/kubeflow/steps/test_training_ddp.py \
  2>&1 | tee "$OUT/ddp_checks.log" | tail -40
rc=${PIPESTATUS[0]}
# keep the logs and configs, drop the checkpoints and images (the device tool returns what is under $OUT)
find "$OUT/tmp" -type f \( -name '*.pth' -o -name '*.png' -o -name '*.jpg' \) -delete 2>/dev/null
exit "$rc"
