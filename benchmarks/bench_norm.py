"""The head's GroupNorm on channels_last bf16 activations: PyTorch's kernel vs retinaflow's NHWC one.

One subnet of the RetinaNet head (4 x conv3x3 256 -> GroupNorm(32) -> ReLU) at the P3..P7 sizes of an
800x1333 batch of 8, channels_last, bf16 autocast, forward + backward, in milliseconds (median of CUDA
event timings). Variants, each in the same process:

- ``none``: no normalisation (ODTK's head), the lower bound;
- ``torch_autocast``: ``nn.GroupNorm`` as autocast runs it (float32, contiguous output);
- ``torch_bf16``: PyTorch's kernel in bf16 (contiguous output);
- ``retinaflow``: the ``retinaflow::group_norm`` CUDA kernel (bf16, channels_last kept), the default;
- ``reference``: the same function in PyTorch ops (what a CUDA machine without the kernels runs).

    python benchmarks/bench_norm.py [--batch 8] [--iters 30]
"""

from __future__ import annotations

import argparse

import torch
from common import emit, time_ms
from torch import nn

from retinaflow.ops import _reference
from retinaflow.ops.norm import group_norm

LEVEL_SIZES = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


class _Norm(nn.GroupNorm):
    def __init__(self, variant: str) -> None:
        super().__init__(32, 256)
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "torch_autocast":
            return super().forward(x)
        if self.variant == "torch_bf16":
            with torch.autocast("cuda", enabled=False):
                return nn.functional.group_norm(
                    x, 32, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps
                )
        if self.variant == "reference":
            return _reference.group_norm(x, self.weight, self.bias, 32, self.eps)[0]
        return group_norm(x, 32, self.weight, self.bias, self.eps)


def _subnet(variant: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers.append(nn.Conv2d(256, 256, 3, padding=1))
        if variant != "none":
            layers.append(_Norm(variant))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers).cuda().to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = False
    feats = [
        torch.randn(args.batch, 256, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
        for h, w in LEVEL_SIZES
    ]
    results: dict[str, float] = {}
    variants = ("none", "torch_autocast", "torch_bf16", "retinaflow", "reference")
    for variant in variants:
        net = _subnet(variant)

        def step(net: nn.Sequential = net) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sum(net(f).float().square().mean() for f in feats)
            loss.backward()  # type: ignore[union-attr]

        results[f"{variant}_ms"] = round(time_ms(step, 5, args.iters), 3)
    base = results["none_ms"]
    for variant in variants[1:]:
        results[f"{variant}_norm_cost_ms"] = round(results[f"{variant}_ms"] - base, 3)
    emit("head_group_norm", {"batch": args.batch, **results})


if __name__ == "__main__":
    main()
