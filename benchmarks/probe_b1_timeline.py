"""Where a batch-1 call of the ``.pt2`` engine spends its time: kernels, gaps between them, and the host.

``bench_engine.py`` times a batch-1 call replayed from a CUDA graph to detections on the host (~2.1 ms on an
H200, the H100 target 2.3 ms); the profiler's kernel time of one replay is ~0.1 ms less
(``probe_b1_captures.py``). This probe profiles ``--calls`` such calls, timed as users call them, and splits
each one's wall time into

- ``host_to_first_kernel``: from the call's start on the host to its first GPU activity (the input copy,
  the graph's launch);
- ``kernels``: the GPU's busy time (kernels, copies and memsets, overlaps counted once);
- ``gaps``: the idle time between the first and the last GPU activity (launch latency inside the graph);
- ``last_kernel_to_host``: from the last GPU activity to the call's return (the result's copy and sync);

and lists one replay's kernels in launch order (name, microseconds) into ``--out`` with the top kernels by
time, so that each layer's share (which pyramid level, which subnet) can be read off.

    python benchmarks/probe_b1_timeline.py ENGINE.pt2 [--calls 20] [--out timeline.json]

Prints one JSON line (the summary); the per-kernel list goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from bench_engine import inputs

from retinaflow.export.engines import open_engine


def busy_and_gaps(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy, idle) microseconds of sorted ``(start, end)`` GPU spans, overlaps counted once."""
    busy = idle = 0.0
    end = spans[0][0]
    for s, e in spans:
        if s > end:
            idle += s - end
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return busy, idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default="timeline.json")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.backends.cudnn.benchmark = True
    engine = open_engine(args.engine, "cuda", cuda_graph=True)
    images, sizes = inputs(1)
    for _ in range(20):
        engine(images, sizes).counts.cpu()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(args.calls):
            with record_function(f"call{k}"):
                engine(images, sizes).counts.cpu()
    events = prof.events()
    calls = sorted(
        (e for e in events if e.name.startswith("call") and e.device_type == torch.autograd.DeviceType.CPU),
        key=lambda e: e.time_range.start,
    )
    gpu = sorted(  # kernels, copies, memsets; not the GPU-side copy of the calls' own annotations
        (
            e
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("call")
        ),
        key=lambda e: e.time_range.start,
    )
    rows: list[dict[str, float]] = []
    sequences: list[list[tuple[str, float]]] = []
    for call in calls:
        lo, hi = call.time_range.start, call.time_range.end
        mine = [e for e in gpu if lo <= e.time_range.start < hi]
        if not mine:
            continue
        spans = [(e.time_range.start, e.time_range.end) for e in mine]
        busy, idle = busy_and_gaps(spans)
        rows.append(
            {
                "wall_us": hi - lo,
                "host_to_first_kernel_us": spans[0][0] - lo,
                "kernels_us": busy,
                "gaps_us": idle,
                "last_kernel_to_host_us": hi - max(e for _, e in spans),
                "activities": len(mine),
            }
        )
        sequences.append([(e.name, e.time_range.end - e.time_range.start) for e in mine])
    if not rows:
        raise SystemExit("probe_b1_timeline: the profiler recorded no GPU activity inside the calls")
    summary = {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]}
    median_call = min(range(len(rows)), key=lambda i: abs(rows[i]["wall_us"] - summary["wall_us"]))
    totals: dict[str, list[float]] = {}
    for name, us in sequences[median_call]:
        totals.setdefault(name, []).append(us)
    top = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:30]
    detail: dict[str, Any] = {
        "engine": args.engine,
        "gpu": torch.cuda.get_device_name(),
        "median_us": summary,
        "calls": rows,
        "top": [{"name": n[:120], "count": len(v), "us": round(sum(v), 1)} for n, v in top],
        "sequence": [(n[:120], round(us, 2)) for n, us in sequences[median_call]],
    }
    Path(args.out).write_text(json.dumps(detail, indent=1))
    print(json.dumps({"engine": args.engine, "gpu": detail["gpu"], "calls": len(rows), "median_us": summary}))


if __name__ == "__main__":
    main()
