"""What a training step pays the first time it meets a padded shape, with cuDNN autotuning off, and whether
a helper thread can pay it while the main thread is busy in Python (as while dynamo traces). Not a
benchmark.

    python benchmarks/probe_new_shape.py [--batch 8] [--shapes 800x1344,1344x800,...]

R50-FPN (frozen-BN backbone, per-level BatchNorm head, 6 classes), channels_last, bf16 autocast, eager
forward + backward (the step's convolutions: the compiled graph calls the same cuDNN convolutions). The
first third of ``--shapes`` is met cold, each timed on its first call and on its next two. The second third
is first run by a helper thread (the same network, copied) while the main thread spins in Python for
``--busy`` seconds, then timed in the main thread like the first. The last third is first run by the main
thread while a helper thread spins in Python (as if dynamo traced there), then timed in the main thread
again. torch keeps cuDNN's convolution plans per thread (``thread_local`` caches in ``Conv_v8.cpp``): if
plans are the cost, only the last third's warming helps. The first shape is run once more after
``torch.cuda.empty_cache()``: new memory's share of a first call, without new convolution plans.
Prints one JSON line: per shape, first-call and steady ms, and each warming's seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time

import torch

from retinaflow.config import ModelConfig
from retinaflow.model.retinanet import build_model


def step_ms(net: torch.nn.Module, batch: int, hw: tuple[int, int]) -> float:
    """One forward + backward at ``hw``, synchronised: ms."""
    x = torch.zeros(batch, 3, *hw, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cls_out, box_out = net(x)
    sum(o.float().mean() for o in [*cls_out, *box_out]).backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def spin(seconds: float) -> int:
    """Pure Python work for ``seconds`` (holding the GIL as dynamo's tracing does): rounds done."""
    t0, spins = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        spins += sum(i * i for i in range(1000)) > 0
    return spins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--shapes",
        default="800x1344,1344x800,768x1024,1024x768,896x1344,1344x896,640x864,864x640,1024x1344,1344x1024,"
        "768x1152,1152x768",
    )
    ap.add_argument("--busy", type=float, default=4.0, help="seconds the main thread spins in Python")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = False
    shapes = [(int(h), int(w)) for h, w in (s.split("x") for s in args.shapes.split(","))]
    cfg = ModelConfig(num_classes=6, norm="frozen_bn")
    net = build_model(cfg).cuda().to(memory_format=torch.channels_last)
    step_ms(net, args.batch, (256, 256))  # CUDA context, cuDNN handles, allocator: not a shape's cost
    third = len(shapes) // 3
    first, second, last = shapes[:third], shapes[third : 2 * third], shapes[2 * third :]
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cold = {f"{h}x{w}": [round(step_ms(net, args.batch, (h, w)), 1) for _ in range(3)] for h, w in first}
    out["cold_first_then_steady_ms"] = cold
    # the first shape again with the allocator's cached memory released: what new memory costs alone (its
    # convolution plans are cached by now)
    torch.cuda.empty_cache()
    out["first_shape_after_empty_cache_ms"] = round(step_ms(net, args.batch, shapes[0]), 1)
    helper_net = copy.deepcopy(net)
    helper: dict[str, float] = {}

    def warm() -> None:
        t0 = time.perf_counter()
        for h, w in second:
            step_ms(helper_net, args.batch, (h, w))
        helper["seconds"] = round(time.perf_counter() - t0, 2)

    thread = threading.Thread(target=warm)
    t0 = time.perf_counter()
    thread.start()
    spins = spin(args.busy)  # the main thread's Python work (dynamo's tracing)
    busy_s = time.perf_counter() - t0
    thread.join()
    out["helper_s"], out["main_busy_s"], out["main_spins"] = helper.get("seconds"), round(busy_s, 2), spins
    out["main_spins_alone"] = spin(args.busy)
    out["helper_warmed_first_then_steady_ms"] = {
        f"{h}x{w}": [round(step_ms(net, args.batch, (h, w)), 1) for _ in range(3)] for h, w in second
    }
    spun: dict[str, int] = {}
    spinner = threading.Thread(target=lambda: spun.setdefault("spins", spin(args.busy)))
    spinner.start()
    t0 = time.perf_counter()
    out["main_warming_ms"] = [round(step_ms(net, args.batch, hw), 1) for hw in last]
    out["main_warming_s"] = round(time.perf_counter() - t0, 2)
    spinner.join()
    out["helper_spins_while_main_warmed"] = spun["spins"]
    out["main_warmed_then_steady_ms"] = {
        f"{h}x{w}": [round(step_ms(net, args.batch, (h, w)), 1) for _ in range(2)] for h, w in last
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
