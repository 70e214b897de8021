"""Where the batch-1 engine's spread comes from: one process, several CUDA-graph captures of one ``.pt2``.

Fresh processes replaying one engine's batch-1 CUDA graph read ~0.1 ms apart (docs/PERFORMANCE.md,
eighteenth to twenty-fifth sessions), with cuDNN autotuned and with its heuristics alike. This probe asks
whether the spread is per capture (then a loader could capture a few graphs and keep the fastest) or per
process (then nothing at load time helps). In one process it captures the engine's batch-1 call

- ``threads``: once on each of K new threads. torch keeps cuDNN's autotuned plans per thread, so each
  capture autotunes again (as a fresh process would) and gets its own memory;
- ``main``: K more times on the main thread: the main thread's plans, new memory each time;

then times every graph in interleaved rounds (median of ``--iters`` replays to detections on the host, as
``bench_engine.py`` times them), again as back-to-back replays (:func:`replay_ms`: how a loader keeping
the fastest capture would rank them), and by the profiler (kernels a replay runs, their GPU time).

    python benchmarks/probe_b1_captures.py ENGINE.pt2 [--captures 4] [--rounds 3] [--iters 100]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from typing import Any

import torch
from bench_engine import inputs
from common import time_ms

from retinaflow.export.engines import open_engine
from retinaflow.ops.graph import CudaGraphRunner


def replay_ms(run: Any, replays: int) -> float:
    """Milliseconds per call of ``run`` (a graph replay) over ``replays`` back-to-back calls (CUDA events):
    the graph's GPU time plus gaps, without the host's round trip per call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    start.record()
    for _ in range(replays):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def kernels(graph: CudaGraphRunner, args: list[torch.Tensor]) -> dict[str, Any]:
    """The kernels one replay of ``graph`` runs: their count and GPU milliseconds (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph(*args)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = [e.name for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return {"kernels": len(names), "gpu_ms": round(sum(e.device_time_total for e in events) / 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--captures", type=int, default=4, help="captures on new threads, and as many on main")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    engine = open_engine(args.engine, "cuda", cuda_graph=True)  # single-threaded runner: capturable
    images, sizes = inputs(1)
    example = [images.cuda().contiguous(), sizes.cuda().contiguous()]

    def run(*tensors: torch.Tensor) -> Any:
        return engine.runner.run(list(tensors))

    graphs: dict[str, CudaGraphRunner] = {}

    def capture(name: str) -> None:
        graphs[name] = CudaGraphRunner(run, example)

    for k in range(args.captures):  # one after another: a capture must not overlap other CUDA work
        thread = threading.Thread(target=capture, args=(f"thread{k}",))
        thread.start()
        thread.join()
    for k in range(args.captures):
        capture(f"main{k}")
    missing = [f"thread{k}" for k in range(args.captures) if f"thread{k}" not in graphs]
    if missing:
        raise SystemExit(f"probe_b1_captures: capture failed on {missing}")

    def timed(graph: CudaGraphRunner) -> float:
        return time_ms(lambda: graph(*example)[0].cpu(), 10, args.iters)

    rounds = [{name: round(timed(g), 4) for name, g in graphs.items()} for _ in range(args.rounds)]
    medians = {name: statistics.median(r[name] for r in rounds) for name in graphs}
    best = min(medians, key=medians.__getitem__)
    # back-to-back replays: the GPU's time per graph, without the host's round trip
    pipelined = {
        name: round(statistics.median(replay_ms(lambda g=g: g(*example), 10) for _ in range(3)), 4)
        for name, g in graphs.items()
    }
    print(
        json.dumps(
            {
                "engine": args.engine,
                "gpu": torch.cuda.get_device_name(),
                "medians_ms": medians,
                "best": best,
                "pipelined_ms": pipelined,
                "best_pipelined": min(pipelined, key=pipelined.__getitem__),
                "spread_threads_ms": round(
                    max(v for n, v in medians.items() if n.startswith("thread"))
                    - min(v for n, v in medians.items() if n.startswith("thread")),
                    4,
                ),
                "spread_main_ms": round(
                    max(v for n, v in medians.items() if n.startswith("main"))
                    - min(v for n, v in medians.items() if n.startswith("main")),
                    4,
                ),
                "kernels": {name: kernels(g, example) for name, g in graphs.items()},
                "rounds": rounds,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
