"""Training throughput on real-shaped data: JPEGs on disk with COCO's spread of sizes and aspect ratios.

The CLI's own trainer (engine.train, default multi-scale jitter, shape buckets) is fed by each peer in turn,
in one process, on the same files:

* ``preloaded`` — batches the torch loader produced, already on the GPU and cycled: no loading cost, the
  same shapes as real training (the upper bound);
* ``torch``     — the DataLoader path (``--workers`` processes, PIL/torchvision decode);
* ``dali``      — the DALI path (nvJPEG decode, GPU resize/flip/colour/pad).

Each peer runs with every ``--cudnn`` setting given (cuDNN autotuning "on"/"off"; "auto" = on with buckets)
and, with ``--compile``, also under torch.compile. img/s is reported for iterations 1..``--first`` (warm-up
and autotuning included) and the next ``--second`` iterations (steady state), with GPU memory (device-wide,
so DALI's pools count) and host CPU seconds per second (this process and its worker processes).

``--loader-only``: the loaders alone, 640x480 JPEGs → jittered resize, flip, pad, normalised bf16 on the
GPU, batch ``--batch`` (target: DALI >= 5,000 img/s on one H100).

    python benchmarks/bench_train_realdata.py [--images 3000] [--first 40 --second 80] [--compile]
    python benchmarks/bench_train_realdata.py --loader-only [--iters 300]

A warm start (issue 13): run ``--compile --peers preloaded --compile-cache FILE`` twice, the second time on
an empty ``TORCHINDUCTOR_CACHE_DIR``: its ``first_step_s`` is what a run restarted from FILE pays.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import emit

from retinaflow.config import Config
from retinaflow.data.select import dali_installed
from retinaflow.data.synthetic import COCO_SIZES, SynthConfig, generate
from retinaflow.engine import compile_cache
from retinaflow.engine import distributed as D
from retinaflow.engine.callbacks import CallbackList
from retinaflow.engine.train import _Trainer

DEVICE = "cuda"  # the CPU smoke test in tests/ switches this


def make_data(root: Path, images: int, sizes: tuple[tuple[int, int], ...]) -> tuple[str, str]:
    """Synthetic JPEGs of the given (width, height) choices (generated once per folder)."""
    ann = root / "annotations" / "train.json"
    if not ann.exists():
        t0 = time.perf_counter()
        cfg = SynthConfig(out=root, images=images, val_fraction=0.0, sizes=sizes, workers=os.cpu_count() or 1)
        generate(cfg)
        print(f"generated {images} images in {time.perf_counter() - t0:.0f} s under {root}", flush=True)
    return str(root / "train"), str(ann)


class CpuMeter:
    """Host CPU seconds used by this process and its children (DataLoader workers) between marks."""

    def __init__(self) -> None:
        try:
            import psutil

            self.proc: Any = psutil.Process()
        except ImportError:
            self.proc = None

    def seconds(self) -> float:
        if self.proc is None:
            t = os.times()
            return t.user + t.system + t.children_user + t.children_system
        total = sum(self.proc.cpu_times()[:2])
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(Exception):  # a worker that just exited
                total += sum(child.cpu_times()[:2])
        return total


def run_peer(config: Config, peer: str, first: int, second: int, out_dir: Path) -> dict[str, Any]:
    """Train ``first + second`` iterations fed by ``peer``; img/s per window, memory, host CPU."""
    cfg = Config.from_dict(config.to_dict())
    cfg.data.loader = "torch" if peer == "preloaded" else peer
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device(DEVICE))
    trainer = _Trainer(cfg, out_dir / f"{peer}.pt", CallbackList([]), info)
    trainer._build()
    batches: Any = iter(trainer.loader)
    if peer == "preloaded":
        batches = itertools.cycle([b.to(DEVICE) for b in itertools.islice(batches, 16)])
        trainer.loader.close()
    meter, windows = CpuMeter(), []
    first_step_s = first_images = 0.0
    caches, phases = "", {}
    for count in (first, second):
        torch.cuda.synchronize()
        t0, c0, images = time.perf_counter(), meter.seconds(), 0
        for _ in range(count):
            batch = next(batches)
            trainer.step(batch)
            trainer.iteration += 1
            images += len(batch)
            if trainer.iteration == 1:  # the warm-up the fixed-shape benchmark leaves out (compile)
                if trainer.store is not None:  # as the training loop does after its first step
                    trainer.store.save()
                torch.cuda.synchronize()
                first_step_s, first_images = time.perf_counter() - t0, len(batch)
                caches = compile_cache.outcome() if cfg.train.compile else ""  # so far in this process
                phases = _compile_phases() if cfg.train.compile else {}
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        windows.append((images / elapsed, (meter.seconds() - c0) / elapsed, images, elapsed))
    used = free_before - torch.cuda.mem_get_info()[0] + torch.cuda.max_memory_allocated()
    if hasattr(trainer.loader, "close"):
        trainer.loader.close()
    del trainer, batches
    return {
        "img_s_first": round(windows[0][0], 1),
        "img_s_second": round(windows[1][0], 1),
        # the measure: all images over all time, iterations 1..first+second
        "img_s_all": round((windows[0][2] + windows[1][2]) / (windows[0][3] + windows[1][3]), 1),
        # the same without iteration 1 (the first compile; bench_train.py's warm-up leaves it out too)
        "first_step_s": round(first_step_s, 1),
        "compile_caches": caches,
        "compile_phases_s": phases,
        "img_s_all_after_first_step": round(
            (windows[0][2] + windows[1][2] - first_images) / (windows[0][3] + windows[1][3] - first_step_s),
            1,
        ),
        "host_cpu_cores_second": round(windows[1][1], 2),
        "gpu_mem_gib": round(used / 2**30, 2),
    }


def _compile_phases(least_s: float = 0.3) -> dict[str, float]:
    """Every compile phase PyTorch timed in this process so far (seconds, nested phases included) that
    took ``least_s`` or more: where a first compiled step's time went."""
    totals = sorted(compile_cache.phase_seconds(None).items(), key=lambda kv: -kv[1])
    return {name: round(t, 2) for name, t in totals if t >= least_s}


def train_benchmark(args: argparse.Namespace, images: str, annotations: str) -> dict[str, Any]:
    config = Config()
    config.data.images, config.data.annotations, config.data.workers = images, annotations, args.workers
    # The network and recipe bench_train.py measures (frozen-BN backbone as with pretrained weights, the
    # default GroupNorm head, the default optimizer), not the GroupNorm backbone "auto" picks for a random
    # init.
    config.model.norm = "frozen_bn"
    t = config.train
    t.batch, t.iters, t.warmup, t.log_every = args.batch, 10**9, 100, 10**9
    t.precision = args.precision
    t.compile_cache = args.compile_cache
    results: dict[str, Any] = {}
    peers = args.peers.split(",")
    if "dali" in peers and not dali_installed():
        print("DALI is not installed: the dali peer is left out (pip install retinaflow[dali])", flush=True)
        peers.remove("dali")
    with tempfile.TemporaryDirectory() as tmp:
        for compiled, cudnn, peer in itertools.product(
            [False, True] if args.compile else [False], args.cudnn.split(","), peers
        ):
            run = dataclasses.replace(
                config.train,
                compile="inductor" if compiled else "",
                cuda_graph=compiled and args.cuda_graph,
                cudnn_benchmark=cudnn,
            )
            cfg = dataclasses.replace(config, train=run)
            name = f"{peer}_{'compiled' if compiled else 'eager'}_cudnn_{cudnn}"
            results[name] = run_peer(cfg, peer, args.first, args.second, Path(tmp))
            print(name, results[name], flush=True)
    ratios = {}
    for name, r in results.items():
        upper = results.get(name.replace(name.split("_")[0], "preloaded", 1))
        if upper and not name.startswith("preloaded"):
            ratios[f"{name}_vs_preloaded"] = round(r["img_s_second"] / upper["img_s_second"], 3)
    return {"runs": results, "ratios": ratios}


def loader_only(args: argparse.Namespace, images: str, annotations: str) -> dict[str, Any]:
    """img/s of each loader alone: decode, jittered resize, flip, pad, normalise to bf16 on the GPU."""
    from retinaflow.data.loader import build_train_loader

    config = Config()
    data = dataclasses.replace(config.data, images=images, annotations=annotations, workers=args.workers)
    out: dict[str, Any] = {}
    if dali_installed():
        # DALI first, so that no torch worker process still decodes on the cores it times (that did not
        # explain the low colour-jitter figure: 2,332 img/s timed first on 2 x H200). The default recipe
        # (colour jitter 0.1, the retinaflow kernel on the padded batch), then without it (the literal
        # target: resize, flip, pad, normalise), the Python source alone, the decoder alone, and the
        # default recipe again. The default recipe has always been the process's first DALI figure and
        # its lowest (2,332 img/s on 2 x H200 against 5,222 without colour jitter, whose GPU work is
        # ~0.25 ms a batch): the repeat tells the recipe's cost from the cost of coming first.
        out["dali_img_s"] = _rate(_dali_batches(data, args.batch), args.iters, args.batch)
        plain = dataclasses.replace(data, color_jitter=0.0)
        out["dali_no_colour_img_s"] = _rate(_dali_batches(plain, args.batch), args.iters, args.batch)
        out["dali_source_only_img_s"] = _rate(_source_only(data, args.batch), args.iters, args.batch)
        out["dali_decode_only_img_s"] = _rate(_decode_only(data, args.batch), args.iters, args.batch)
        out["dali_again_img_s"] = _rate(_dali_batches(data, args.batch), args.iters, args.batch)
    torch_loader, _ = build_train_loader(data, args.batch, seed=0)

    def torch_batches() -> Any:
        for b in torch_loader:
            yield _normalised(b.images.to("cuda", non_blocking=True))

    out["torch_img_s"] = _rate(torch_batches(), args.iters, args.batch)
    if "dali_img_s" in out:
        out["ratio"] = round(out["dali_img_s"] / out["torch_img_s"], 2)
    return out


def _dali_source(data: Any, batch: int) -> Any:
    from retinaflow.data.coco import CocoDataset
    from retinaflow.data.dali_source import BatchSource, train_plans
    from retinaflow.data.sampler import train_batches
    from retinaflow.data.transforms import TrainTransform

    dataset = CocoDataset(data.images, data.annotations, None)
    sampler, policy = train_batches(dataset, data, batch, 0, 0, 1, 0)
    colour = data.color_jitter > 0
    return BatchSource(dataset, train_plans(sampler, TrainTransform(data)), policy, data.max_size, colour)


def _dali_batches(data: Any, batch: int) -> Any:
    """DALI's batches (colour jitter included when on), normalised to bf16 as the torch peer's."""
    from retinaflow.data.dali import PipelineOptions, build_pipeline, run_batch

    source = _dali_source(data, batch)
    pipe = build_pipeline(source, PipelineOptions(batch, torch.cuda.current_device()))
    while True:
        yield _normalised(run_batch(pipe, source, torch.device("cuda")).images)


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalised(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 on the GPU → ImageNet-normalised bf16, channels_last (what both peers end with),
    by the model's own arithmetic (``RetinaNet.normalize``: ``x * scale + shift``). The constants are made
    once per device: a tensor built from a list on every call is copied from pageable memory, which waits
    for the GPU (two host syncs per batch held the DALI loader back)."""
    from retinaflow.model.retinanet import IMAGENET_MEAN, IMAGENET_STD

    if images.device not in _CONSTANTS:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        _CONSTANTS[images.device] = ((1 / std).to(images.device), (-mean / std).to(images.device))
    scale, shift = _CONSTANTS[images.device]
    x = images.contiguous(memory_format=torch.channels_last).float()
    return torch.addcmul(shift, x, scale).to(torch.bfloat16)


def _decode_only(data: Any, batch: int) -> Any:
    """The same files through DALI's "mixed" JPEG decoder alone (no resize, flip or pad): the GPU stage's
    floor, to split the loader's time between host feed, decoding and the rest."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    files = sorted(Path(data.images).glob("*.jpg"))
    order = itertools.cycle(files)

    def source() -> list[Any]:
        return [np.fromfile(next(order), dtype=np.uint8) for _ in range(batch)]

    @pipeline_def(batch_size=batch, num_threads=max(4, data.workers), device_id=torch.cuda.current_device())
    def decode() -> Any:
        return fn.decoders.image(fn.external_source(source=source, batch=True), device="mixed")

    pipe = decode()
    pipe.build()
    while True:
        (out,) = pipe.run()
        yield out


def _source_only(data: Any, batch: int) -> Any:
    source = _dali_source(data, batch)
    while True:
        yield source()
        source.pop()


def _rate(batches: Any, iters: int, batch: int) -> float:
    for _ in range(10):
        next(batches)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        next(batches)
    torch.cuda.synchronize()
    return round(iters * batch / (time.perf_counter() - t0), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/retinaflow_realdata", help="dataset folder (generated if absent)")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--first", type=int, default=40, help="iterations of the first window (paper: 500)")
    ap.add_argument("--second", type=int, default=80, help="iterations of the second window (paper: 500)")
    ap.add_argument("--peers", default="preloaded,torch,dali")
    ap.add_argument("--cudnn", default="off,on", help="cuDNN autotuning: auto,on,off (off: default)")
    ap.add_argument("--compile", action="store_true", help="also run every peer under torch.compile")
    ap.add_argument("--cuda-graph", action="store_true", help="compiled runs from CUDA graphs")
    ap.add_argument(
        "--compile-cache",
        default="",
        help="train.compile_cache: compiled artifacts read before the first step, written after it",
    )
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--workers", type=int, default=15, help="torch DataLoader workers")
    ap.add_argument("--loader-only", action="store_true", help="time the loaders alone on 640x480 JPEGs")
    ap.add_argument("--iters", type=int, default=300, help="batches timed with --loader-only")
    args = ap.parse_args()
    if args.loader_only:
        images, annotations = make_data(Path(args.data + "_640x480"), args.images, ((640, 480),))
        emit("loader_throughput", {"batch": args.batch, **loader_only(args, images, annotations)})
        return
    images, annotations = make_data(Path(args.data), args.images, COCO_SIZES)
    out = {"batch": args.batch, "precision": args.precision, "images": args.images}
    out |= {"iterations": [args.first, args.second], **train_benchmark(args, images, annotations)}
    emit("train_realdata", out)


if __name__ == "__main__":
    main()
