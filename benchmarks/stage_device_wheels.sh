#!/usr/bin/env bash
# Stage what the GPU machine lacks, on this machine, before the device calls:
#   .whl/            pycocotools (0.4 MB): carry it with every call (`carry=[".whl"]`); run_wave_gpu.sh
#                    installs it into /tmp/site
#   .device-wheels/  DALI 2.4.0 with the dependencies it imports (~250 MB, 5 parts of < 64 MB): one device call
#                    per part, back to back (the machine and its /tmp go back ~30 s after a call):
#                    `bash .device-wheels/partK/receive.sh` with `carry=[".device-wheels/partK"]`, the last part
#                    together with the real command. DALI alone does not import there: it needs the pins
#                    below (the twenty-fourth session lost three calls finding out).
# Usage: bash benchmarks/stage_device_wheels.sh   (from the repository root; needs PyPI, not the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
wheel() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"; }
rm -rf .whl && mkdir -p .whl && wheel pycocotools==2.0.10 -d .whl
rm -rf .device-wheels
../shared/device/stage-wheels.sh .device-wheels nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 \
  nvidia-libnvcomp-cu13==5.3.0.16 optree==0.20.0 gast==0.7.0 astunparse==1.6.3 libcst==1.9.0 makefun==1.16.0 \
  nvtx==0.2.17 six==1.17.0
ls .whl .device-wheels
