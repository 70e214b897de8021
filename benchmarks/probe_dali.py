"""Where the DALI training loader's time goes, and which pipeline formulation is fastest: a search for
PERFORMANCE.md (issue 13's 5,000 img/s target), not a benchmark.

Same data and batches as ``bench_train_realdata.py --loader-only`` (640x480 JPEGs, batch 16, default
jitter, colour jitter 0.1, bf16 normalisation at the end). Each variant changes how the DALI graph
resizes, flips and pads (the host source and the colour kernel are the product's):

* ``now``       — the product's graph: resize → flip → pad;
* ``roi``       — the flip folded into the resize (a reversed relative ROI), then pad;
* ``roi_crop``  — as ``roi``, padding by an out-of-bounds crop instead of ``fn.pad``;
* ``*_dyn``     — the same graph on DALI's dynamic executor (``exec_dynamic=True``);
* ``*_t8``      — eight CPU threads instead of four (``*_t2``: two);
* ``*_hwNN``    — the decoder's ``hw_decoder_load`` at NN % (default 65: the rest of each batch is decoded
  by nvJPEG's hybrid path, Huffman on DALI's CPU threads; ``_hw100`` sends every JPEG to the H100's
  hardware decoder).

For each: img/s with and without colour jitter, and for ``--profile`` variants the GPU time per batch by
kernel (torch.profiler sees DALI's kernels too: one CUPTI per process). The colour kernel and the bf16
normalisation are also timed alone on one batch (CUDA events).

    python benchmarks/probe_dali.py [--variants now,roi,...] [--profile now,roi] [--iters 200]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import torch
from bench_train_realdata import _dali_source, _normalised, _rate, make_data
from common import emit

from retinaflow.config import Config


def build(source: Any, batch: int, variant: str) -> Any:
    """The DALI graph of ``variant`` fed by a product BatchSource."""
    from nvidia.dali import fn, pipeline_def, types

    base = variant.split("_")[0] if not variant.startswith("roi_crop") else "roi_crop"
    dynamic = "_dyn" in variant
    threads = 8 if "_t8" in variant else 2 if "_t2" in variant else 4
    hw = re.search(r"_hw(\d+)", variant)
    decoder_args = {"hw_decoder_load": int(hw.group(1)) / 100} if hw else {}

    @pipeline_def(enable_conditionals=False)
    def graph() -> Any:
        files, rx, ry, flips, shapes = fn.external_source(source=source, num_outputs=5, batch=True)
        images: Any = fn.decoders.image(
            files, device="mixed", output_type=types.DALIImageType.RGB, **decoder_args
        )
        linear = types.DALIInterpType.INTERP_LINEAR
        if base == "now":
            images = fn.resize(images, resize_x=rx, resize_y=ry, antialias=True, interp_type=linear)
            images = fn.flip(images, horizontal=flips)
            return fn.pad(images, axes=(0, 1), shape=shapes, fill_value=0)
        f = fn.cast(flips, dtype=types.FLOAT)
        start = fn.stack(f * 0.0, f)
        end = fn.stack(f * 0.0 + 1.0, 1.0 - f)
        images = fn.resize(
            images,
            resize_x=rx,
            resize_y=ry,
            roi_start=start,
            roi_end=end,
            roi_relative=True,
            antialias=True,
            interp_type=linear,
        )
        if base == "roi":
            return fn.pad(images, axes=(0, 1), shape=shapes, fill_value=0)
        hw = fn.cast(shapes, dtype=types.FLOAT)
        return fn.crop(
            images,
            crop_h=hw[0],
            crop_w=hw[1],
            crop_pos_x=0.0,
            crop_pos_y=0.0,
            out_of_bounds_policy="pad",
            fill_values=0,
        )

    kwargs = {"exec_dynamic": True} if dynamic else {}
    pipe = graph(
        batch_size=batch,
        num_threads=threads,
        device_id=torch.cuda.current_device(),
        seed=0,
        prefetch_queue_depth=2,
        **kwargs,
    )
    pipe.build()
    return pipe


def batches(data: Any, batch: int, variant: str) -> Any:
    """Endless normalised bf16 batches of ``variant`` (colour jitter when ``data`` has it)."""
    from retinaflow.data.dali import run_batch

    source = _dali_source(data, batch)
    pipe = build(source, batch, variant)
    while True:
        yield _normalised(run_batch(pipe, source, torch.device("cuda")).images)


def profile(it: Any, steps: int) -> dict[str, Any]:
    """GPU ms per batch by kernel name (top 12) and in all, over ``steps`` batches."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(10):
        next(it)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            next(it)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per_kernel: dict[str, float] = collections.defaultdict(float)
    busy = []
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            per_kernel[e.name[:90]] += e.device_time_total / 1e3 / steps
            busy.append((e.time_range.start, e.time_range.end))
    busy.sort()
    union, end = 0.0, -1.0  # GPU busy time: the union of kernel intervals (streams overlap)
    for s, e in busy:
        if e > end:
            union += e - max(s, end)
            end = e
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "wall_ms_per_batch": round(wall * 1e3 / steps, 3),
        "gpu_busy_ms_per_batch": round(union / 1e3 / steps, 3),
        "kernel_ms_sum_per_batch": round(sum(per_kernel.values()), 3),
        "top_kernels_ms": {k: round(v, 3) for k, v in top},
    }


def alone(data: Any, batch: int) -> dict[str, float]:
    """ms per call of the colour kernel and of the bf16 normalisation on one padded batch."""
    from retinaflow.data.dali import run_batch
    from retinaflow.data.transforms import colour_jitter_batch

    plain = dataclasses.replace(data, color_jitter=0.0)
    source = _dali_source(plain, batch)
    b = run_batch(build(source, batch, "now"), source, torch.device("cuda"))
    factors = torch.full((batch, 3), 1.05)
    out = {}
    for name, fn in {
        "colour_ms": lambda: colour_jitter_batch(b.images, b.sizes, factors),
        "normalise_ms": lambda: _normalised(b.images),
    }.items():
        for _ in range(5):
            fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        stop.record()
        stop.synchronize()
        out[name] = round(start.elapsed_time(stop) / 50, 3)
    out["padded_shape"] = list(b.images.shape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/retinaflow_realdata")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--variants", default="now_dyn,now_dyn_hw100,now_dyn_hw90,now_dyn_hw0,now_dyn_t2")
    ap.add_argument(
        "--profile", default="now_dyn,now_dyn_hw100", help="variants to profile (30 batches each)"
    )
    args = ap.parse_args()
    images, annotations = make_data(Path(args.data + "_640x480"), args.images, ((640, 480),))
    data = dataclasses.replace(Config().data, images=images, annotations=annotations, workers=4)
    plain = dataclasses.replace(data, color_jitter=0.0)
    out: dict[str, Any] = {"batch": args.batch, "alone": alone(data, args.batch)}
    print(out, flush=True)
    for v in args.variants.split(","):
        try:
            r = {"img_s": _rate(batches(data, args.batch, v), args.iters, args.batch)}
            r["no_colour_img_s"] = _rate(batches(plain, args.batch, v), args.iters, args.batch)
            if v in args.profile.split(","):
                r["profile"] = profile(batches(data, args.batch, v), 30)
        except Exception as exc:  # one variant's failure (an unsupported argument) must not end the search
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        out[v] = r
        print(v, r, flush=True)
    emit("probe_dali", out)


if __name__ == "__main__":
    main()
