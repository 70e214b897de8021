"""Where the NMS kernel's ~141 us go: its GPU time against max_det, the candidate count and the classes.

The NMS kernel (one block per image) first compacts and sorts the candidates (twice: by score, then by
class), then walks the survivors best first, one or two block barriers per kept box, and stops at max_det.
Its time at max_det = 1 is the compaction, sorts and gathers; the slope over max_det is the walk's cost per
kept box. Inputs: ``bench_postprocess.py``'s R50-FPN head outputs for an 800x1333 image (fp16, ~5,000
candidates after decode, 80 classes), decoded once; then

- ``max_det``: 1, 10, 25, 50, 100 on all candidates;
- ``candidates``: the first 1,000 / 2,000 / all of them, at max_det 1 and 100;
- ``classes``: the same boxes with their classes folded onto 1, 8 or 80 (long same-class runs, as when one
  class dominates an image), at max_det 100.

Each figure: the median GPU time of the NMS kernel over ``--calls`` calls (torch.profiler), in us, and the
boxes kept.

    python benchmarks/probe_nms_phases.py [--calls 30]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch
from bench_postprocess import CFG, anchors_per_level, heads

from retinaflow.ops import _ext, boxes


def nms_us(scores: torch.Tensor, bxs: torch.Tensor, classes: torch.Tensor, max_det: int, calls: int) -> dict:
    """Median GPU microseconds of the NMS kernel per call, and the boxes kept (image 0)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        d = boxes.batched_nms(scores, bxs, classes, CFG.nms_iou, max_det)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            boxes.batched_nms(scores, bxs, classes, CFG.nms_iou, max_det)
        torch.cuda.synchronize()
    times = [
        e.device_time_total
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "nms_kernel" in e.name
    ]
    return {"us": round(statistics.median(times), 1), "kept": int(d.counts[0])}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    _ext.load()
    cls, box = heads(1, seed=1)
    cls, box = [c.half() for c in cls], [b.half() for b in box]
    sizes = torch.tensor([[800, 1333]], device="cuda")
    scores, bxs, classes = boxes.decode_detections(
        cls, box, anchors_per_level(), sizes, CFG.score_thresh, CFG.top_n
    )
    valid = int((classes >= 0).sum())
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "rows": scores.shape[1], "valid": valid}
    res["max_det"] = {m: nms_us(scores, bxs, classes, m, args.calls) for m in (1, 10, 25, 50, 100)}
    res["candidates"] = {
        k: {m: nms_us(scores[:, :k], bxs[:, :k], classes[:, :k], m, args.calls) for m in (1, 100)}
        for k in (1000, 2000, scores.shape[1])
    }
    res["classes"] = {
        c: nms_us(scores, bxs, torch.where(classes >= 0, classes % c, classes), 100, args.calls)
        for c in (1, 8, 80)
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
