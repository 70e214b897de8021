#!/usr/bin/env bash
# The CLI on the GPU machine, one call: synthesize data, `retinaflow train --compile` (inductor, bf16,
# channels_last), then `retinaflow infer` eager vs `--compile --cuda-graph` on the val images, and
# compare the two detection files (score threshold 0: every image keeps 100). No pycocotools there, so nothing is evaluated; random init (no
# weights package there). Usage (device tool): bash benchmarks/run_cli_gpu.sh -> logs under $OUT
set -euo pipefail
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; W=$(mktemp -d); mkdir -p "$OUT"
python -m retinaflow.ops.build 2>&1 | tail -1
python -m retinaflow data synth --out "$W/d" --images 160 --seed 0 | tail -1
time python -m retinaflow train "$W/m.pth" --config synthetic_cpu --images "$W/d/train" \
  --annotations "$W/d/annotations/train.json" --iters 100 --batch 16 --compile --precision bf16 \
  --set train.backbone_weights=null --set train.channels_last=true --checkpoint-every 100 2>&1 | tail -4 | tee "$OUT/train.log"
common=(--images "$W/d/val" --resize 256 --max-size 256 --precision fp16 --score-thresh 0.0)
time python -m retinaflow infer "$W/m.pth" "${common[@]}" --output "$W/eager.json" | tee "$OUT/infer_eager.log"
time python -m retinaflow infer "$W/m.pth" "${common[@]}" --output "$W/fast.json" --compile --cuda-graph \
  | tee "$OUT/infer_fast.log"
python - "$W/eager.json" "$W/fast.json" <<'PY' | tee "$OUT/compare.txt"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
def top(d):
    per = {}
    for x in d:
        per.setdefault(x["image_id"], []).append(x["score"])
    return {k: sorted(v, reverse=True)[:5] for k, v in per.items()}
ta, tb = top(a), top(b)
diff = max(abs(x - y) for k in ta for x, y in zip(ta[k], tb.get(k, [])))
print(f"eager {len(a)} detections on {len(ta)} images; compiled+graph {len(b)} on {len(tb)}; "
      f"max top-5 score difference {diff:.4f}")
PY
