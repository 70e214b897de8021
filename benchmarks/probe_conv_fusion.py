"""Probe: do cuDNN's fused convolution epilogues (bias + ReLU, bias + residual add + ReLU) beat inductor's
separate Triton pass after each convolution? R50-FPN (GroupNorm head), BN folded, fp16, channels_last,
800x1344, the network alone (no post-processing).

Variants: eager, eager with the backbone's convolutions through ``torch.cudnn_convolution_relu`` /
``torch.cudnn_convolution_add_relu``, ``torch.compile`` of each. Batch 32: img/s (GPU-bound); batch 1: ms
per CUDA-graph replay. Also: can AOTInductor package a graph that calls ``aten.cudnn_convolution_relu``?

    python benchmarks/probe_conv_fusion.py [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from retinaflow.config import Config
from retinaflow.engine.infer import prepare_for_inference
from retinaflow.model.retinanet import build_model

H, W = 800, 1344


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.cudnn_convolution_relu(
        x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


class ConvReLU(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_relu(self.conv, x)


class FusedBottleneck(nn.Module):
    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.downsample = (
            block.conv1,
            block.conv2,
            block.conv3,
            block.downsample,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_relu(self.conv2, conv_relu(self.conv1, x))
        identity = x if self.downsample is None else self.downsample(x)
        c = self.conv3
        return torch.cudnn_convolution_add_relu(
            out, c.weight, identity, 1.0, c.bias, c.stride, c.padding, c.dilation, c.groups
        )


def fuse(model: nn.Module) -> nn.Module:
    body = model.backbone.body
    body.conv1 = ConvReLU(body.conv1)
    body.relu = nn.Identity()
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if hasattr(body, name):
            layer = getattr(body, name)
            for i, block in enumerate(layer):
                layer[i] = FusedBottleneck(block)
    return model


def build(fused: bool) -> nn.Module:
    cfg = Config()
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda()
    prepare_for_inference(model, torch.float16)
    model = model.to(memory_format=torch.channels_last)
    return fuse(model) if fused else model


def flat(out) -> torch.Tensor:
    cls, box = out
    return torch.cat([t.float().flatten() for t in (*cls, *box)])


def time_fn(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def graph_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, iters: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    return time_fn(g.replay, iters * 4)


def aoti_check(tmp: Path) -> str:
    conv = nn.Conv2d(64, 64, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    mod = ConvReLU(conv).eval()
    x = torch.randn(2, 64, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    prog = torch.export.export(mod, (x,))
    path = torch._inductor.aoti_compile_and_package(prog, package_path=str(tmp / "p.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    got = runner(x)
    ref = torch.relu(nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    return f"ok, max abs diff {float((got - ref).abs().max()):.3g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    result: dict[str, object] = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = {
        b: torch.randint(0, 256, (b, 3, H, W), dtype=torch.uint8, device="cuda", generator=gen)
        for b in (1, 32)
    }
    ref = None
    for fused in (False, True):
        model = build(fused)
        with torch.no_grad():
            out = flat(model(images[1]))
            if ref is None:
                ref = out
            else:
                result["fused_vs_plain_max_rel"] = float((out - ref).abs().max() / ref.abs().max())
        for compiled in (False, True):
            name = ("fused" if fused else "plain") + ("_compiled" if compiled else "_eager")
            fn = torch.compile(model) if compiled else model
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    fn(images[32])
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    ms32 = time_fn(lambda fn=fn: fn(images[32]), args.iters)
                    fn(images[1])
                    ms1 = graph_ms(fn, images[1], args.iters)
                result[name] = {
                    "b32_img_s": round(32e3 / ms32, 1),
                    "b1_graph_ms": round(ms1, 3),
                    "first_s": first,
                }
            except Exception as e:
                result[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            print(json.dumps({name: result[name]}), flush=True)
        del model
        torch.cuda.empty_cache()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result["aoti_cudnn_convolution_relu"] = aoti_check(Path(tmp))
    except Exception as e:
        result["aoti_cudnn_convolution_relu"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
