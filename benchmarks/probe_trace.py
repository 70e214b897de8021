"""How long dynamo takes to trace the training forward, by how the input's height and width reach it.

What ``--compile`` pays at every warm start (the compile caches skip everything after tracing):

    python benchmarks/probe_trace.py static|dynamic|blocks [--regions] [--no-autocast] [--profile N]

``static``: one shape; ``dynamic``: symbolic height and width (``maybe_mark_dynamic``); ``blocks``: the
trainer's default for several padded shapes (``engine.blocks``: the input viewed as (N, C, h, 32, w, 32),
symbolic in h and w). ``--regions`` marks the ResNet bottlenecks as ``torch.compiler.nested_compile_region``.
``--no-autocast`` traces in fp32 (autocast's casts are part of the symbolic cost). ``--profile N`` runs the
first trace under cProfile and prints the N functions with the most cumulative time: where the trace goes.
Runs on the CPU (tracing is host work) with the default network (frozen-BN R50, per-level BatchNorm head);
the backend hands the graph back unchanged, and the time printed is from the call to the backend, for each
new shape.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import time

import torch

from retinaflow.config import ModelConfig
from retinaflow.engine.blocks import BlockInput, to_blocks
from retinaflow.model.retinanet import build_model

SHAPES = ((640, 960), (800, 1216), (1024, 768), (704, 1056))
BLOCK = 32  # the default data.pad_stride: every padded shape is a multiple of it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["static", "dynamic", "blocks"])
    ap.add_argument("--regions", action="store_true")
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if args.regions:
        import torchvision.models.resnet as resnet

        resnet.Bottleneck.forward = torch.compiler.nested_compile_region(resnet.Bottleneck.forward)
    model = build_model(ModelConfig()).train()
    model.to(memory_format=torch.channels_last)
    profiler = cProfile.Profile() if args.profile else None
    handed: list[float] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        handed.append(time.perf_counter())
        if profiler is not None:
            profiler.disable()  # the trace only, not the graph's run
        return gm.forward

    net = torch.compile(BlockInput(model, BLOCK) if args.mode == "blocks" else model, backend=backend)
    traced: list[float | None] = []
    for height, width in SHAPES[: 1 if args.mode == "static" else None]:
        x = torch.randn(1, 3, height, width).contiguous(memory_format=torch.channels_last)
        if args.mode == "blocks":
            x = to_blocks(x, BLOCK)  # marks h and w dynamic
        elif args.mode == "dynamic":
            torch._dynamo.maybe_mark_dynamic(x, 2)
            torch._dynamo.maybe_mark_dynamic(x, 3)
        autocast = (
            contextlib.nullcontext() if args.no_autocast else torch.autocast("cpu", dtype=torch.bfloat16)
        )
        start, graphs = time.perf_counter(), len(handed)
        if profiler is not None and not traced:
            profiler.enable()
        with autocast:
            cls_out, box_out = net(x)
        sum(t.float().sum() for t in [*cls_out, *box_out]).backward()
        traced.append(round(handed[-1] - start, 2) if len(handed) > graphs else None)
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    print(
        json.dumps(
            {
                "mode": args.mode,
                "regions": args.regions,
                "autocast": not args.no_autocast,
                "shapes": SHAPES,
                "traced_s": traced,
            }
        )
    )


if __name__ == "__main__":
    main()
