"""AOTInductor engine (.pt2) vs the eager PyTorch path: R50-FPN, 800x1333 (padded to 800x1344), FP16.

End to end from a uint8 image batch already on the GPU to detections on the host (``counts.cpu()``):
pre-processing, network (BN folded, fp16 weights), decode + NMS (retinaflow CUDA kernels). The engine is
exported once with a 1..32 batch range (by ``retinaflow export`` in a subprocess, random init weights),
loaded with ``open_engine`` (load time measured) and run at batch 1 (latency) and batch 32 (throughput),
as loaded and replayed from CUDA graphs (``open_engine(..., cuda_graph=True)``); the eager detector
(``make_detector(..., inference_only=True)``) runs the same inputs in the same process.
Issue 15 targets: batch-1 latency <= 2.3 ms, batch-32 throughput >= 720 img/s.

    python benchmarks/bench_engine.py [--iters 50] [--engine existing.pt2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import emit, gpu_kernels, time_ms

from retinaflow.config import Config
from retinaflow.engine.checkpoint import save_checkpoint
from retinaflow.engine.infer import load_model, make_detector
from retinaflow.export.engines import open_engine
from retinaflow.model.retinanet import build_model

HEIGHT, WIDTH, IMAGE_WIDTH = 800, 1344, 1333
TARGET_LATENCY_MS, TARGET_THROUGHPUT = 2.3, 720.0


def write_checkpoint(folder: Path) -> Path:
    """A random-init R50-FPN (80 classes) checkpoint with the default inference settings."""
    cfg = Config()
    cfg.class_names = [f"c{i}" for i in range(cfg.model.num_classes)]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    payload = {"arch": model.arch, "model": model.state_dict(), "config": cfg.to_dict()}
    payload.update(class_names=cfg.class_names, category_ids=list(range(1, 81)), iteration=0)
    return save_checkpoint(folder / "r50.pth", payload)


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, 800, 1344) on the GPU (an 800x1333 image padded right) and its sizes."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    images = torch.zeros(batch, 3, HEIGHT, WIDTH, dtype=torch.uint8, device="cuda")
    images[..., :IMAGE_WIDTH] = torch.randint(
        0, 256, (batch, 3, HEIGHT, IMAGE_WIDTH), dtype=torch.uint8, device="cuda", generator=gen
    )
    sizes = torch.tensor([[HEIGHT, IMAGE_WIDTH]] * batch, device="cuda")
    return images, sizes


def measure_batches(run, batches: list[int], iters: int) -> dict[str, float]:
    """``run(images, sizes) -> Detections`` timed to detections on the host: batch-1 latency (ms) and
    other batches' throughput (img/s)."""
    out = {}
    for batch in batches:
        images, sizes = inputs(batch)
        ms = time_ms(lambda images=images, sizes=sizes: run(images, sizes).counts.cpu(), 10, iters)
        if batch == 1:
            out["latency_b1_ms"] = ms
        else:
            out[f"throughput_b{batch}_img_s"] = batch * 1e3 / ms
    return out


def measure(run, iters: int) -> dict[str, float]:
    """Batch-1 latency (ms) and batch-32 throughput (img/s) of ``run(images, sizes) -> Detections``."""
    return measure_batches(run, [1, 32], iters)


def kernel_classes(run, batch: int, calls: int = 3) -> dict[str, Any]:
    """GPU milliseconds per call of ``run`` at ``batch``, per kernel class and for the top 20 kernels."""
    from torch.profiler import ProfilerActivity, profile

    images, sizes = inputs(batch)
    for _ in range(3):
        run(images, sizes).counts.cpu()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run(images, sizes).counts.cpu()
    return gpu_kernels(prof, calls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--engine", help="an existing .pt2 built by this script (skips the export)")
    ap.add_argument("--keep", help="folder to keep the checkpoint and engine in")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench_engine_"))
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(folder)
    compile_s = None
    engine_path = Path(args.engine) if args.engine else folder / "r50_fp16.pt2"
    if not args.engine:  # in its own process, as users run it (the load below then starts clean)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "retinaflow", "export", str(checkpoint), str(engine_path)]
        cmd += ["--precision", "fp16", "--batch", "1", "32", "--size", str(HEIGHT), str(WIDTH)]
        subprocess.run([*cmd, "--device", "cuda"], check=True)
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = open_engine(engine_path, "cuda")
    load_s = time.perf_counter() - t0
    pt2 = measure(engine, args.iters)
    graphed = measure(open_engine(engine_path, "cuda", cuda_graph=True), args.iters)
    model, config, _ = load_model(checkpoint, torch.device("cuda"))
    eager = measure(make_detector(model, config, torch.float16, inference_only=True), args.iters)
    results = {
        "pt2": {**pt2, "load_s": round(load_s, 3), "export_compile_s": compile_s},
        "pt2_cuda_graph": graphed,
        "eager": eager,
        "targets": {"latency_b1_ms": TARGET_LATENCY_MS, "throughput_b32_img_s": TARGET_THROUGHPUT},
        "meets_targets": graphed["latency_b1_ms"] <= TARGET_LATENCY_MS
        and max(pt2["throughput_b32_img_s"], graphed["throughput_b32_img_s"]) >= TARGET_THROUGHPUT,
        "ratio_latency_pt2_over_eager": pt2["latency_b1_ms"] / eager["latency_b1_ms"],
        "ratio_throughput_pt2_over_eager": pt2["throughput_b32_img_s"] / eager["throughput_b32_img_s"],
        "engine": str(engine_path),
    }
    emit("engine", results)


if __name__ == "__main__":
    main()
