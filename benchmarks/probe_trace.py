"""How long dynamo takes to trace the training forward, by how the input's height and width reach it.

What ``--compile`` pays at every warm start (the compile caches skip everything after tracing):

    python benchmarks/probe_trace.py static|dynamic|blocks [--regions]

``static``: one shape; ``dynamic``: symbolic height and width (``maybe_mark_dynamic``, what training on
several padded shapes uses); ``blocks``: symbolic, with H = 32·h and W = 32·w visible to the compiler (the
input viewed as (N, C, h, 32, w, 32) and reshaped inside). ``--regions`` marks the ResNet bottlenecks as
``torch.compiler.nested_compile_region``. Runs on the CPU (tracing is host work); the backend hands the
graph back unchanged, and the time printed is from the call to the backend, for each new shape.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from retinaflow.config import ModelConfig
from retinaflow.model.retinanet import build_model

SHAPES = ((640, 960), (800, 1216), (1024, 768), (704, 1056))
BLOCK = 32  # the default data.pad_stride: every padded shape is a multiple of it


class Blocks(nn.Module):
    """The model on (N, C, h·BLOCK, w·BLOCK), called with (N, C, h, BLOCK, w, BLOCK)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n, c, h, s, w, s2 = x.shape
        return self.model(x.reshape(n, c, h * s, w * s2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["static", "dynamic", "blocks"])
    ap.add_argument("--regions", action="store_true")
    args = ap.parse_args()
    if args.regions:
        import torchvision.models.resnet as resnet

        resnet.Bottleneck.forward = torch.compiler.nested_compile_region(resnet.Bottleneck.forward)
    model = build_model(ModelConfig(norm="frozen_bn", head_norm="gn")).train()
    model.to(memory_format=torch.channels_last)
    handed: list[float] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        handed.append(time.perf_counter())
        return gm.forward

    net = torch.compile(Blocks(model) if args.mode == "blocks" else model, backend=backend)
    traced: list[float | None] = []
    for height, width in SHAPES[: 1 if args.mode == "static" else None]:
        x = torch.randn(1, 3, height, width).contiguous(memory_format=torch.channels_last)
        dims = (2, 3)
        if args.mode == "blocks":
            x, dims = x.view(1, 3, height // BLOCK, BLOCK, width // BLOCK, BLOCK), (2, 4)
        if args.mode != "static":
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(x, d)
        start, graphs = time.perf_counter(), len(handed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cls_out, box_out = net(x)
        sum(t.float().sum() for t in [*cls_out, *box_out]).backward()
        traced.append(round(handed[-1] - start, 2) if len(handed) > graphs else None)
    print(json.dumps({"mode": args.mode, "regions": args.regions, "shapes": SHAPES, "traced_s": traced}))


if __name__ == "__main__":
    main()
