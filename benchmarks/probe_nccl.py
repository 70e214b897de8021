"""All-reduce time and bus bandwidth between the GPUs of this host, at DDP's gradient sizes: how long the
all-reduce of a step's gradients takes when nothing overlaps it (compiled DDP's case). Not a benchmark.

    torchrun --nproc_per_node 2 benchmarks/probe_nccl.py [--mb 25,100,150]

Rank 0 prints one JSON line: per size and dtype, median ms of ``all_reduce`` and the bus bandwidth
(``2 (n - 1) / n x bytes / time``, NCCL's own convention). ``NCCL_DEBUG=INFO`` shows the transport.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="25,100,150", help="message sizes in MB (fp32 gradients)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    out: dict[str, dict[str, float]] = {}
    for mb in (float(m) for m in args.mb.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            n = int(mb * 2**20 / 4)  # elements of an fp32 gradient of mb MB; bf16 sends half the bytes
            x = torch.ones(n, dtype=dtype, device="cuda")
            for _ in range(3):
                dist.all_reduce(x)
            times = []
            for _ in range(args.iters):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dist.all_reduce(x)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            ms = statistics.median(times)
            nbytes = x.numel() * x.element_size()
            out[f"{mb:g}MB_{str(dtype).split('.')[-1]}"] = {
                "ms": round(ms, 3),
                "bus_GB_s": round(2 * (world - 1) / world * nbytes / ms / 1e6, 1),
            }
    if rank == 0:
        print(json.dumps({"world": world, "all_reduce": out}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
