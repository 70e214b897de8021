"""What cuDNN autotuning (``cudnn.benchmark``) costs and gains, each setting in a fresh process.

cuDNN's plan cache outlives a change of the flag (a process that autotuned once keeps using the tuned
plans with the flag off), so on/off comparisons inside one process are wrong: this driver runs each
(mode, setting) in its own subprocess. R50-FPN (80 classes), channels_last, on the padded shapes of a
bucketed run (``--shapes``, H x W each):

* ``train``: forward + loss + backward + SGD step, batch ``--batch``, bf16 autocast;
* ``infer``: the network forward under ``inference_mode``, BN folded, fp16 weights, batch ``--batch``.

For each it reports the seconds of the first pass over all shapes (where autotuning is paid) and the
steady-state ms per iteration averaged over the shapes. Decides ``train.cudnn_benchmark`` /
``infer.cudnn_benchmark`` defaults (docs/PERFORMANCE.md).

    python benchmarks/bench_cudnn.py [--batch 8] [--shapes 896x1408,1408x896,768x1280] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import emit, time_ms

from retinaflow.config import Config
from retinaflow.engine.infer import prepare_for_inference
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.loss import detection_loss
from retinaflow.model.retinanet import build_model


def one(
    mode: str, benchmark: bool, shapes: list[tuple[int, int]], batch: int, iters: int
) -> dict[str, float]:
    """Runs in the child process: first-pass seconds and steady ms/iteration for one setting."""
    torch.backends.cudnn.benchmark = benchmark
    cfg = Config()
    model = build_model(cfg.model).cuda().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    if mode == "infer":
        model = prepare_for_inference(model.eval(), torch.float16)
    else:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def runner(h: int, w: int):
        images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=gen).cuda()
        images = images.contiguous(memory_format=torch.channels_last)
        if mode == "infer":

            def forward() -> None:
                with torch.inference_mode():
                    model(images)

            return forward
        xy = torch.rand(batch, 10, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        boxes = torch.cat([xy, xy + 32 + torch.rand(batch, 10, 2, generator=gen) * 200], -1).cuda()
        labels = torch.randint(0, 80, (batch, 10), generator=gen).cuda()
        anchors = generate_anchors(cfg.model.anchors, (h, w), torch.device("cuda"), torch.float32)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                cls, box = model(images)
            loss = detection_loss(cls, box, anchors, boxes, labels, cfg.loss, cfg.matcher)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    runs = [runner(h, w) for h, w in shapes]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for run in runs:
        run()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    steady = [time_ms(run, 2, iters) for run in runs]
    return {"first_pass_s": round(first, 2), "steady_ms": round(sum(steady) / len(steady), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shapes", default="896x1408,1408x896,768x1280,1024x1408,1280x768,640x1024")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.child:
        mode, setting = args.child
        print(json.dumps(one(mode, setting == "on", shapes, args.batch, args.iters)))  # type: ignore[arg-type]
        return
    results: dict[str, dict[str, float]] = {}
    for mode in ("train", "infer"):
        for setting in ("off", "on"):
            cmd = [sys.executable, __file__, "--child", mode, setting]
            cmd += ["--batch", str(args.batch), "--shapes", args.shapes, "--iters", str(args.iters)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
            results[f"{mode}_{setting}"] = (
                json.loads(last) if proc.returncode == 0 else {"error": proc.stderr[-400:]}
            )
        off, on = results[f"{mode}_off"], results[f"{mode}_on"]
        if "steady_ms" in off and "steady_ms" in on:
            results[f"{mode}_speedup_on_over_off"] = {"steady": round(off["steady_ms"] / on["steady_ms"], 3)}
    emit("cudnn_autotuning", {"batch": args.batch, "shapes": args.shapes, **results})


if __name__ == "__main__":
    main()
