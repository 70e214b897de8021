"""Where the inference network's GPU time goes: the top CUDA kernels of one R50-FPN forward, eager and
(``--compile``) under torch.compile. A diagnostic for PERFORMANCE.md, not a benchmark.

    python benchmarks/profile_network.py [--batch 8] [--compile]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from retinaflow.config import Config
from retinaflow.engine.infer import prepare_for_inference
from retinaflow.model.retinanet import build_model


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    cfg = Config()
    cfg.model.num_classes = 80
    model = build_model(cfg.model).cuda().eval().to(memory_format=torch.channels_last)
    prepare_for_inference(model, torch.float16)  # as `retinaflow infer` does
    net = torch.compile(model, dynamic=False) if args.compile else model
    x = torch.zeros(args.batch, 800, 1344, 3, dtype=torch.uint8, device="cuda").permute(0, 3, 1, 2)
    for _ in range(5):
        net(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            net(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
