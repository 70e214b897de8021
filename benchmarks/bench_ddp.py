"""Multi-GPU DDP in one call: throughput scaling, 1-vs-N-GPU equivalence, sharded evaluation.

    python benchmarks/bench_ddp.py --gpus 1,2,4 --out-dir $OUT [--loaders torch,dali] [--compile] [--profile]

The driver writes a JPEG dataset (the synthetic generator) with COCO's sizes and aspect ratios
(``--sizes coco``: several padded shapes) or all 1333x800 (``--sizes fixed``: one shape, so that
``--compile`` compiles once), then launches ``torchrun`` workers (this file, ``worker`` sub-command) for:

1. **throughput**: R50-FPN, 800x1333 (shorter side 800, long side capped at 1333), bf16, batch 8 per GPU,
   the real training loop (``retinaflow.engine.train.train``) with each of ``--loaders``, on 1 and N GPUs.
   img/s is *global* (images of all ranks per second) over the same steady-state window of iterations
   (after ``--warmup``), from rank 0's wall times at the log steps (every 10 iterations, as a real run
   logs; each log step syncs the host, so wall time is GPU time + loader waits); ``img_s_log_steps``: the
   min / median / max of the img/s between consecutive log steps, how steady the window was;
   ``slowest_log_steps``: the five longest stretches between log steps, [last iteration, seconds] (where
   a run lost its time: start-up, a new shape's compile or CUDA-graph recording, a loader stall). The loader
   alone (same workers, this rank's share) is timed too, to tell a loader-bound run from a GPU-bound one.
2. **equivalence**: MobileNetV2-FPN, 512 px: N GPUs x batch b vs 1 GPU x batch N*b from the same seed (same
   initial weights): loss curves compared as means over windows, and validation mAP after training; a
   second 1-GPU run with another seed gives the noise both differences are judged against.
3. **sharded evaluation**: the equivalence checkpoint evaluated on N ranks (each its shard, gathered) vs on
   one rank: the same detections and the same COCO stats.

``--profile``: each throughput run also profiles 10 iterations on rank 0 after its img/s window (GPU busy
ms and kernel launches per step, the top host ops): a GPU-bound step is ~100 % busy, a host-bound one
is not.

``--profile-start``: rank 0 samples its Python stacks from the training's start to the end of its first
step and reports the functions on the stack longest, what its other threads were doing, its CPU seconds
and how busy the host was (``start_profile_rank0``): where a start-up goes.

``--cudagraphs`` and ``--compile-shapes blocks|dynamic|static``: the compiled runs' ``train.cuda_graph`` and
``train.compile_shapes``.

``--one-rank-ddp``: the 1-GPU throughput run is repeated wrapped in DDP (a process group of one), so that
what DDP and compiled DDP's graph split cost shows apart from waiting for peers (``ddp_cost_1``).

Prints one JSON object (and writes it to ``--out-dir/ddp.json``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import COMPILE_SHAPES, Config
from retinaflow.engine.callbacks import Callback, TrainState

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------------
# worker side (runs under torchrun)
# ---------------------------------------------------------------------------------------------------
class _StepLog(Callback):
    """Rank 0: iteration and wall time when training starts (iteration 0: the model and loader built, no
    step run; ``--tp-warmup 0`` times from there, compile included) and at every log step
    (``train.log_every``), with the loss of each log step."""

    def __init__(self) -> None:
        self.iterations: list[int] = []
        self.times: list[float] = []
        self.losses: list[float] = []
        self.val_map: float | None = None

    def on_train_start(self, state: TrainState) -> None:
        self._mark(state.iteration)

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._mark(state.iteration)
        self.losses.append(metrics["loss"])

    def _mark(self, iteration: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.iterations.append(iteration)
        self.times.append(time.perf_counter())

    def on_validation(self, state: TrainState, result: Any) -> None:
        self.val_map = result.map


class _Profile(Callback):
    """Rank 0: a ``torch.profiler`` window of ``train.log_every`` iterations from the first log step at or
    after ``start``; :func:`profile_summary` of it. Tells a GPU-bound step (GPU busy ~100 %) from one that
    waits for the host (launches, syncs) or for the other ranks."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.prof: Any = None
        self.t0 = 0.0
        self.it0 = 0
        self.summary: dict[str, Any] = {}
        self.syncs = SyncCounter()

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.summary or state.iteration < self.start:
            return
        if self.prof is None:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.syncs.start()
            self.t0, self.it0 = time.perf_counter(), state.iteration
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        syncs = self.syncs.stop()
        self.prof.__exit__(None, None, None)
        self.summary = profile_summary(self.prof, wall, state.iteration - self.it0)
        self.summary["host_syncs"] = syncs


def _host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole host so far (/proc/stat; zeros where there is none)."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class _StartProfile(Callback):
    """Rank 0: where the training's start-up goes, from its start to the end of its first step (what a warm
    launch pays: dynamo tracing, cache loads, whatever else runs first). A thread samples the Python
    stacks every ``interval`` s (no tracing overhead, so the timed run is not slowed). ``summary``:

    * ``main``: the training thread's functions on the most samples, "file:line(name)": seconds on the
      stack (inclusive);
    * ``other_threads``: each other Python thread's innermost frames by seconds (the loader's host-source
      thread among them: does it hold the interpreter while dynamo traces?);
    * ``wall_s``, ``process_cpu_s`` (all of this process's threads), ``host_busy``: the fraction of all
      the host's cores busy over the window (other ranks, compile workers, loaders)."""

    def __init__(self, interval: float = 0.02, rows: int = 40) -> None:
        import threading

        self.interval, self.rows = interval, rows
        self.seconds: dict[str, float] = defaultdict(float)
        self.others: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.summary: dict[str, Any] = {}
        self.done = threading.Event()
        self.thread: Any = None
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.host0 = (0.0, 0.0)

    def _sample(self, target: int) -> None:
        import threading

        names = {t.ident: t.name for t in threading.enumerate()}
        me = threading.get_ident()
        last = time.perf_counter()
        while not self.done.wait(self.interval):
            frames = sys._current_frames()
            now = time.perf_counter()  # each sample weighs the time since the last (GIL waits included)
            for ident, frame in frames.items():
                if ident == me:
                    continue
                if ident != target:
                    if ident not in names:
                        names = {t.ident: t.name for t in threading.enumerate()}
                    code = frame.f_code
                    key = f"{Path(code.co_filename).name}:{frame.f_lineno}({code.co_name})"
                    self.others[names.get(ident, str(ident))][key] += now - last
                    continue
                seen = set()
                walk: Any = frame
                while walk is not None:
                    code = walk.f_code
                    seen.add(f"{Path(code.co_filename).name}:{code.co_firstlineno}({code.co_name})")
                    walk = walk.f_back
                for key in seen:
                    self.seconds[key] += now - last
            last = now

    def on_train_start(self, state: TrainState) -> None:
        import threading

        self.t0, self.cpu0, self.host0 = time.perf_counter(), sum(os.times()[:2]), _host_cpu()
        self.thread = threading.Thread(target=self._sample, args=(threading.get_ident(),), daemon=True)
        self.thread.start()

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.thread is None or self.done.is_set():
            return
        wall, cpu, host = time.perf_counter() - self.t0, sum(os.times()[:2]) - self.cpu0, _host_cpu()
        self.done.set()
        self.thread.join()

        def top(seconds: dict[str, float], rows: int) -> dict[str, float]:
            return {k: round(v, 2) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])[:rows]}

        total = host[1] - self.host0[1]
        self.summary = {
            "wall_s": round(wall, 2),
            "process_cpu_s": round(cpu, 2),
            "host_busy": round((host[0] - self.host0[0]) / total, 3) if total > 0 else None,
            "main": top(self.seconds, self.rows),
            "other_threads": {name: top(s, 3) for name, s in self.others.items()},
        }


class SyncCounter:
    """Counts the host syncs the code between ``start`` and ``stop`` makes, by Python call stack.

    ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (``.item()``,
    ``.tolist()``, a copy from pageable memory, ``nonzero``...) warn; each warning is counted under
    the innermost ``depth`` frames of the Python stack that made it, not printed. A step that queues
    its work without waiting for the GPU has none; the log steps' ``.tolist()`` are expected.
    ``stop`` returns {"file:line < caller:line < ...": count}.
    """

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self.sites: Counter[str] = Counter()

    def _record(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in Path(f.filename).name]
        self.sites[" < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][: self.depth])] += 1

    def start(self) -> None:
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> dict[str, int]:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        return dict(self.sites.most_common())


def profile_summary(prof: Any, wall_s: float, steps: int) -> dict[str, Any]:
    """Per step: wall ms, GPU busy ms (kernels and copies), kernel launches; the top host ops by self time;
    the GPU time per kernel class and of the top kernels."""
    from common import gpu_kernels
    from torch.autograd import DeviceType

    rows = prof.key_averages()

    def device_us(row: Any) -> float:  # the attribute's name changed across torch versions
        return float(getattr(row, "self_device_time_total", getattr(row, "self_cuda_time_total", 0.0)))

    launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    launches = sum(r.count for r in rows if r.key in launch_names)
    # device-side rows only (kernels, copies); NCCL's stream overlaps the compute stream, so the busy
    # fraction can exceed 1 when communication overlaps compute
    busy_us = sum(device_us(r) for r in rows if getattr(r, "device_type", None) == DeviceType.CUDA)
    top = sorted(rows, key=lambda r: r.self_cpu_time_total, reverse=True)[:8]
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_s * 1e3 / steps, 2),
        "gpu_busy_ms_per_step": round(busy_us / 1e3 / steps, 2),
        "gpu_busy_fraction": round(busy_us / 1e6 / wall_s, 3) if wall_s > 0 else None,
        "kernel_launches_per_step": round(launches / steps, 1),
        "top_host_ops_ms_per_step": {r.key[:60]: round(r.self_cpu_time_total / 1e3 / steps, 2) for r in top},
        # which kernels take the GPU's time (per step): compiled for symbolic or static shapes, which lose?
        "gpu_kernels_per_step": gpu_kernels(prof, steps, top=15),
    }


def _config(args: argparse.Namespace, world: int) -> Config:
    cfg = Config()
    data = Path(args.data)
    cfg.data.images, cfg.data.annotations = str(data / "train"), str(data / "annotations/train.json")
    cfg.data.workers, cfg.data.loader = args.workers, args.loader
    t = cfg.train
    t.iters, t.batch, t.seed, t.precision = args.iters, args.batch_per_gpu * world, args.seed, "bf16"
    t.checkpoint_every, t.warmup, t.milestones = 0, min(100, args.iters // 4), ()
    # Throughput: log (a host sync and an all-reduce) every 10 steps, as a real run does; equivalence
    # compares the loss of every step.
    t.log_every = 10 if args.task == "throughput" else 1
    t.compile = "inductor" if args.compile else ""
    t.cuda_graph = args.compile and args.cudagraphs  # train.cuda_graph: the compiled step from CUDA graphs
    t.compile_shapes = args.compile_shapes  # one symbolic graph (in blocks or not), or one per bucket
    t.compile_cache = args.compile_cache  # the compiler's artifacts, one set per GPU: read, then rewritten
    t.compile_package = args.compile_package  # and the compiled forward packaged: later starts skip dynamo
    if args.task == "throughput":
        cfg.model.num_classes = 6
        # The network bench_train.py measures (frozen BN backbone, default head). Left at "auto", random
        # init resolves to a GroupNorm backbone (model.norm), which trains R50 ~3.4x slower.
        cfg.model.norm = "frozen_bn"
        lo, hi = (int(v) for v in args.jitter.split(","))
        cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 800, 1333, (lo, hi)
        t.cudnn_benchmark = args.cudnn
    else:  # small and quick to converge: the equivalence / evaluation model
        cfg.model.backbone, cfg.model.fpn_channels, cfg.model.head_convs = "mobilenet_v2", 128, 2
        cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 512, 512, (448, 512)
        cfg.matcher.allow_low_quality = True  # the default optimizer and lr (AdamW 5e-4), clipping 10
        cfg.data.val_images, cfg.data.val_annotations = str(data / "val"), str(data / "annotations/val.json")
        cfg.infer.resize, cfg.infer.max_size = 512, 512
    return cfg


def _loader_rate(cfg: Config, rank: int, world: int, batches: int) -> float:
    """img/s of this rank's training loader alone (same workers and transforms as the run)."""
    from retinaflow.data.select import build_train

    local = int(os.environ.get("LOCAL_RANK", "0"))  # the GPU of this node (= rank on one node)
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    loader, _ = build_train(cfg.data, cfg.train.batch // world, cfg.train.seed, rank, world, 0, device)
    it = iter(loader)
    for _ in range(5):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it))
    rate = n / (time.perf_counter() - t0)
    if hasattr(loader, "close"):
        loader.close()
    return rate


def worker(args: argparse.Namespace) -> None:
    from retinaflow.engine.train import train

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    # the trainer's INFO lines in the launch's log, as `retinaflow train` prints them (the first step's
    # compile-cache outcome and phase times among them)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("retinaflow").setLevel(logging.INFO)
    if args.task == "evaluate":
        _worker_evaluate(args)
        return
    cfg = _config(args, world)
    if args.force_ddp:
        _force_ddp()
        cfg.train.grad_sync = "ddp"  # auto would average after backward: one node
    if args.ddp_options:
        _use_ddp_options(args.ddp_options, cfg)
    log = _StepLog()
    callbacks: list[Callback] = [log]
    # Profiled: iterations iters-20 .. iters-10, after the img/s window (the profiler slows what it sees).
    profiler = _Profile(args.iters - 20) if args.task == "throughput" and args.profile else None
    if profiler is not None:
        callbacks.append(profiler)
    start = _StartProfile() if args.profile_start and rank == 0 else None
    if start is not None:
        callbacks.append(start)
    called = time.perf_counter()
    train(cfg, Path(args.checkpoint), callbacks)
    result: dict[str, Any] = {"world": world, "global_batch": cfg.train.batch}
    if rank == 0:
        # the trainer's set-up before iteration 1, outside the img/s window: the model, the loader, the
        # compile cache and package loaded (dynamo's tracing and the compile are in the first step, inside it)
        result["setup_s"] = round(log.times[0] - called, 1) if log.times else None
        first = next((i for i, it in enumerate(log.iterations) if it >= args.warmup), None)
        end = len(log.times) - 1
        if profiler is not None:  # the window ends where the profiled iterations begin
            end = max((i for i, it in enumerate(log.iterations) if it <= profiler.start), default=end)
        if first is not None and first < end:
            steps = log.iterations[end] - log.iterations[first]
            result["img_s"] = round(steps * cfg.train.batch / (log.times[end] - log.times[first]), 1)
            result["window"] = [log.iterations[first] + 1, log.iterations[end]]
            result["img_s_log_steps"] = _spread(log, first, end, cfg.train.batch)
            result["slowest_log_steps"] = _slowest(log, first, end)
        result["losses"] = log.losses
        result["val_map"] = log.val_map
        if profiler is not None:
            result["profile_rank0"] = profiler.summary
        if start is not None:
            result["start_profile_rank0"] = start.summary
    if args.task == "throughput":  # the process group is gone: time each rank's loader alone
        result["loader_img_s_rank"] = round(_loader_rate(_config(args, world), rank, world, 30), 1)
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))


def _stretches(log: _StepLog, first: int, end: int) -> list[tuple[int, int, float]]:
    """The window's stretches between consecutive log steps: (iterations, last iteration, seconds)."""
    return [
        (log.iterations[i + 1] - log.iterations[i], log.iterations[i + 1], log.times[i + 1] - log.times[i])
        for i in range(first, end)
    ]


def _spread(log: _StepLog, first: int, end: int, batch: int) -> list[float]:
    """Min, median and max of the img/s between consecutive log steps of the window: how steady it was
    (a window's mean hides a slow stretch; two runs' means differ by about this spread)."""
    rates = sorted(n * batch / seconds for n, _, seconds in _stretches(log, first, end))
    return [round(rates[0], 1), round(rates[len(rates) // 2], 1), round(rates[-1], 1)]


def _slowest(log: _StepLog, first: int, end: int, count: int = 5) -> list[list[float]]:
    """The ``count`` longest stretches between log steps of the window, as [last iteration, seconds]:
    where a run lost its time (a recompile, a new shape's first step, a loader stall)."""
    spans = sorted(_stretches(log, first, end), key=lambda span: -span[2])[:count]
    return [[last, round(seconds, 2)] for _, last, seconds in spans]


def _force_ddp() -> None:
    """Make a one-rank run train through DistributedDataParallel (a process group of one): what DDP and,
    compiled, dynamo's split at its buckets cost with no peer to wait for and nothing to exchange."""
    import torch.distributed as dist

    from retinaflow.engine import distributed as D

    D.DistInfo.distributed = property(lambda self: True)  # type: ignore[method-assign, assignment]
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _use_ddp_options(text: str, cfg: Config) -> None:
    """Make the trainer's ``DistributedDataParallel(...)`` also get these keyword arguments (``k=0|1,...``):
    a benchmark-side switch, so that DDP settings are compared before one becomes the trainer's.

    Four keys are not DDP arguments: ``optimize_ddp`` (0, 1 or a mode such as ``python_reducer``) is what
    the trainer sets ``torch._dynamo.config.optimize_ddp`` to for a compiled DDP model,
    ``compiled_autograd`` (0|1) sets ``torch._dynamo.config.compiled_autograd`` (the Python reducer needs it),
    ``comm_hook`` (bf16|fp16) registers DDP's gradient compression hook of that name, and ``grad_sync``
    sets ``cfg.train.grad_sync`` (``ddp``; ``after_backward``: no DDP at all, gradients averaged after
    backward); other keys imply ``grad_sync=ddp``.
    Other values are numbers (``bucket_cap_mb=100``) or strings.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from retinaflow.engine import grad_sync

    def value(v: str) -> Any:
        if v in ("0", "1"):
            return bool(int(v))
        with contextlib.suppress(ValueError):
            return float(v) if "." in v else int(v)
        return v

    pairs = [item.split("=", 1) for item in text.split(",") if item]
    options: dict[str, Any] = {k: value(v) for k, v in pairs}
    # DDP's own options mean DDP: the default (grad_sync auto) averages after backward on one node.
    cfg.train.grad_sync = options.pop("grad_sync", "ddp" if options else cfg.train.grad_sync)
    if "optimize_ddp" in options:
        grad_sync.COMPILED_DDP_SPLIT = options.pop("optimize_ddp")
    if "compiled_autograd" in options:
        torch._dynamo.config.compiled_autograd = options.pop("compiled_autograd")
    hook = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook, None: None}[
        options.pop("comm_hook", None)
    ]
    base = torch.nn.parallel.DistributedDataParallel

    class WithOptions(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **{**kw, **options})
            if hook is not None:
                self.register_comm_hook(None, hook)

    torch.nn.parallel.DistributedDataParallel = WithOptions  # type: ignore[misc]


def _worker_evaluate(args: argparse.Namespace) -> None:
    """Detections of the val set sharded over the ranks (gathered) vs all on rank 0; COCO stats of both."""
    from retinaflow.data.loader import build_eval_loader
    from retinaflow.engine import distributed as D
    from retinaflow.engine.evaluate import evaluate_detections
    from retinaflow.engine.infer import load_model, predict
    from retinaflow.engine.schedule import autocast_dtype

    info = D.init_distributed()
    model, cfg, state = load_model(args.checkpoint, info.device)
    dtype = autocast_dtype("bf16", info.device)
    cat_ids = list(state["category_ids"])
    data = Path(args.data)
    images, ann = data / "val", data / "annotations/val.json"
    data_cfg = cfg.data
    data_cfg.resize, data_cfg.max_size, data_cfg.pad_stride = cfg.infer.resize, cfg.infer.max_size, 32

    def detect(rank: int, world: int) -> list[dict[str, Any]]:
        loader, _ = build_eval_loader(images, ann, data_cfg, cfg.infer.batch, rank, world)
        return predict(model, loader, cfg, info.device, dtype, cat_ids)

    sharded = D.gather_to_main(detect(info.rank, info.world_size), info)
    if info.is_main and sharded is not None:
        merged = [d for part in sharded for d in part]
        alone = detect(0, 1)
        names = list(cfg.class_names)
        stats_n = evaluate_detections(str(ann), merged, names).stats
        stats_1 = evaluate_detections(str(ann), alone, names).stats
        key = lambda d: (d["image_id"], d["category_id"], round(d["score"], 4))  # noqa: E731
        a, b = sorted(merged, key=key), sorted(alone, key=key)
        box_diff = max(
            (
                max(abs(x - y) for x, y in zip(p["bbox"], q["bbox"], strict=True))
                for p, q in zip(a, b, strict=False)
            ),
            default=0.0,
        )
        out = {
            "detections_sharded": len(merged),
            "detections_one_rank": len(alone),
            "same_image_category_pairs": sorted((d["image_id"], d["category_id"]) for d in merged)
            == sorted((d["image_id"], d["category_id"]) for d in alone),
            "max_box_diff_px": round(box_diff, 5) if len(a) == len(b) else None,
            "stats_equal": stats_n == stats_1,
            "AP_sharded": stats_n["AP"],
            "AP_one_rank": stats_1["AP"],
        }
        Path(args.result).write_text(json.dumps(out))
    D.shutdown(info)


# ---------------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------------
def _launch(
    args: argparse.Namespace, gpus: int, task: str, name: str, *, visible: str | None = None, **extra: Any
) -> dict[str, Any]:
    """One torchrun launch of ``gpus`` workers (on the GPUs ``visible`` lists, default all); its result."""
    from common import spawn

    result = Path(args.work) / f"{name}.json"
    ckpt = Path(args.work) / f"{name}.pth"
    ckpt.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
        *args.torchrun_arg, str(HERE), "worker", "--task", task, "--data", args.data_dir, "--checkpoint",
        str(extra.pop("checkpoint", ckpt)), "--result", str(result),
    ]  # fmt: skip
    for key, value in extra.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:  # 0 is a value (--tp-warmup 0), not "off"
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    t0 = time.perf_counter()
    log = Path(args.work) / f"{name}.log"  # written as the run goes: a run cut short keeps its log
    with log.open("w") as sink:
        proc = spawn(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        proc.wait()
    if proc.returncode != 0:
        text = log.read_text(errors="replace")
        tail = [line[-300:] for line in text.strip().splitlines()[-6:]]
        return {"error": f"exit {proc.returncode}", "causes": _exception_lines(text), "tail": tail}
    out = json.loads(result.read_text())
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _concurrent_singles(
    args: argparse.Namespace, gpus: int, tag: str, one: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """``gpus`` independent 1-GPU runs at once, one per GPU: each one's img/s against the 1-GPU run alone.
    Near 1: ranks do not slow each other's host (a slower N-GPU step is waiting at the all-reduce for the
    slower rank); below 1: they do (shared cores, memory bandwidth, clocks)."""
    with concurrent.futures.ThreadPoolExecutor(gpus) as pool:
        names = [f"tp_{tag}_{gpus}x1gpu_{g}" for g in range(gpus)]
        futures = [
            pool.submit(_launch, args, 1, "throughput", n, visible=str(g), **extra)
            for g, n in enumerate(names)
        ]
        runs = [f.result() for f in futures]
    rates = [float(r["img_s"]) for r in runs if "img_s" in r]
    out: dict[str, Any] = {f"{gpus}x1gpu_concurrent_img_s": rates}
    if "img_s" in one and len(rates) == gpus:
        out[f"{gpus}x1gpu_concurrent_vs_alone"] = round(sum(rates) / gpus / one["img_s"], 3)
    else:  # a run failed, or its window was too short for an img/s
        out[f"{gpus}x1gpu_concurrent_without_img_s"] = [r for r in runs if "img_s" not in r]
    return out


def _exception_lines(text: str) -> list[str]:
    """The distinct exception lines of the workers' output (torchrun's own summary left out), retinaflow's
    own (``MissingDependency: ...``, ``TrainingDiverged: ...``) included."""
    names = r"[\w.]*(?:Error|Exception|Interrupted|Diverged|Dependency|Mismatch)"
    found = re.findall(rf"^(?:\[rank\d+\]:)?\s*({names}: .*)$", text, re.M)
    return list(dict.fromkeys(line for line in found if "ChildFailedError" not in line))[:8]


def _windows(losses: list[float], size: int) -> list[float]:
    return [sum(losses[i : i + size]) / size for i in range(0, len(losses) - size + 1, size)]


def _compare_losses(a: list[float], b: list[float], size: int) -> float:
    """Largest relative difference between window means of two loss curves."""
    wa, wb = _windows(a, size), _windows(b, size)
    return max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(wa, wb, strict=False))


def driver(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE.parent))
    from common import environment, stop_children_on_signal

    stop_children_on_signal()

    from retinaflow.data.synthetic import COCO_SIZES, SynthConfig, generate

    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = COCO_SIZES if args.sizes == "coco" else ((1333, 800),)
    if not (Path(args.data_dir) / "annotations" / "val.json").is_file():  # kept between invocations
        generate(SynthConfig(out=Path(args.data_dir), images=args.images, seed=0, sizes=sizes))
    report: dict[str, Any] = {
        "env": environment(),
        "gpus": args.gpus,
        "dataset_s": round(time.perf_counter() - t0),
        "jitter": args.jitter,
        "cudnn_benchmark": args.cudnn,
        "cudagraphs": args.cudagraphs,
        "compile_shapes": args.compile_shapes,
        "compile_cache": args.compile_cache,
        "compile_package": args.compile_package,
        "inductor_cpp_wrapper": os.environ.get("TORCHINDUCTOR_CPP_WRAPPER") == "1",  # run_wave_gpu.sh's `cpp`
    }
    counts = sorted({int(g) for g in str(args.gpus).split(",")})  # exactly these: 1 is the scaling baseline
    n = counts[-1]
    common = {"iters": args.tp_iters, "warmup": args.tp_warmup, "batch_per_gpu": 8, "workers": args.workers}
    common |= {
        "profile": args.profile,
        "profile_start": args.profile_start,
        "jitter": args.jitter,
        "cudnn": args.cudnn,
        "cudagraphs": args.cudagraphs,
        "compile_shapes": args.compile_shapes,
        "compile_cache": args.compile_cache or None,
        "compile_package": args.compile_package,
    }
    modes = (
        []
        if args.skip_throughput
        else [True]
        if args.compile_only
        else [False, True]
        if args.compile
        else [False]
    )
    runs = [(comp, loader) for comp in modes for loader in args.loaders.split(",")]
    variants = [("", "")] * (not args.only_variants) + [
        tuple(v.split("=", 1))  # type: ignore[misc]
        for v in args.ddp_variant
    ]
    # Eager throughput first, then equivalence and evaluation, compiled throughput last (the longest);
    # the report is rewritten after each step, so a run cut short still leaves what it measured.
    steps = [r for r in runs if not r[0]] + [None] + [r for r in runs if r[0]]
    for step in steps:
        if step is None:
            if not args.skip_equivalence:
                report |= _equivalence(args, n)
            _write_report(args, report)
            continue
        comp, loader = step
        tag = f"{loader}_{'compiled' if comp else 'eager'}"
        entry: dict[str, Any] = {}
        for gpus in counts:
            # One GPU runs no DDP: its figure is every variant's baseline.
            for variant, options in variants if gpus > 1 else [("", "")]:
                key = f"{gpus}gpu" + (f"_{variant}" if variant else "")
                run = _launch(
                    args, gpus, "throughput", f"tp_{tag}_{key}", compile=comp, loader=loader,
                    ddp_options=options, **common,
                )  # fmt: skip
                run.pop("losses", None)
                entry[key] = run
                one = entry.get("1gpu", {})  # without a 1-GPU run: no scaling figures
                if gpus == 1 and args.one_rank_ddp:
                    ddp = _launch(
                        args, 1, "throughput", f"tp_{tag}_1gpu_ddp", compile=comp, loader=loader,
                        force_ddp=True, **common,
                    )  # fmt: skip
                    ddp.pop("losses", None)
                    entry["1gpu_ddp"] = ddp
                    if "img_s" in one and "img_s" in ddp:
                        entry["ddp_cost_1"] = round(ddp["img_s"] / one["img_s"], 3)
                if gpus > 1 and args.concurrent_singles and not variant:
                    entry |= _concurrent_singles(args, gpus, tag, one, compile=comp, loader=loader, **common)
                suffix = f"{gpus}" + (f"_{variant}" if variant else "")
                if gpus > 1 and "img_s" in one and "img_s" in run:
                    entry[f"scaling_{suffix}"] = round(run["img_s"] / one["img_s"], 3)
                    entry[f"efficiency_{suffix}"] = round(run["img_s"] / one["img_s"] / gpus, 3)
                report[f"throughput_{tag}"] = entry
                _write_report(args, report)
    print(json.dumps(report, indent=1))


def _write_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    (Path(args.out_dir) / "ddp.json").write_text(json.dumps(report, indent=1))


def _equivalence(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """N GPUs x b vs 1 GPU x N*b (and a second seed for the noise), then sharded evaluation."""
    report: dict[str, Any] = {}
    eq = {"iters": args.eq_iters, "warmup": 20, "batch_per_gpu": args.eq_batch, "workers": args.workers}
    ddp = _launch(args, n, "equivalence", "eq_ddp", seed=0, **eq)
    single = _launch(
        args, 1, "equivalence", "eq_single", seed=0, **{**eq, "batch_per_gpu": n * args.eq_batch}
    )
    noise = _launch(
        args, 1, "equivalence", "eq_single_seed1", seed=1, **{**eq, "batch_per_gpu": n * args.eq_batch}
    )
    summary: dict[str, Any] = {
        "iters": args.eq_iters,
        "batch": f"{n}x{args.eq_batch} vs 1x{n * args.eq_batch}",
    }
    if all("losses" in r for r in (ddp, single, noise)):
        size = max(10, args.eq_iters // 10)
        summary["loss_window"] = size
        summary["loss_rel_diff_ddp_vs_single"] = round(
            _compare_losses(ddp["losses"], single["losses"], size), 4
        )
        summary["loss_rel_diff_seed_noise"] = round(
            _compare_losses(noise["losses"], single["losses"], size), 4
        )
        summary["loss_windows"] = {
            k: [round(v, 4) for v in _windows(r["losses"], size)]
            for k, r in (("ddp", ddp), ("single", single), ("single_seed1", noise))
        }
        summary["val_map"] = {
            "ddp": ddp["val_map"],
            "single": single["val_map"],
            "single_seed1": noise["val_map"],
        }
    else:
        summary["errors"] = {
            k: r for k, r in (("ddp", ddp), ("single", single), ("noise", noise)) if "losses" not in r
        }
    report["equivalence"] = summary
    report["sharded_evaluation"] = _launch(
        args, n, "evaluate", "eval_sharded", checkpoint=Path(args.work) / "eq_ddp.pth"
    )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("run", help="the whole benchmark (default)")
    d.add_argument(
        "--gpus",
        default="1,2",
        help="GPU counts, comma-separated: throughput at each (1,2,4; scaling against 1 when given)",
    )
    d.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp/bench_ddp"))
    d.add_argument("--work", default="/tmp/bench_ddp_work")
    d.add_argument("--data-dir", default="/tmp/bench_ddp_data")
    d.add_argument("--images", type=int, default=1200)
    d.add_argument(
        "--sizes",
        choices=["coco", "fixed"],
        default="coco",
        help="JPEG sizes: COCO's spread (varied padded shapes) or all 1333x800 (one shape: --compile then "
        "compiles once; use another --data-dir than the coco data)",
    )
    d.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    d.add_argument(
        "--jitter",
        default="800,800",
        help="throughput runs' shorter-side jitter LO,HI (800,800: the issues' 800x1333; 640,1024: default)",
    )
    d.add_argument(
        "--cudnn",
        default="off",
        choices=["off", "on", "auto"],
        help="throughput runs' train.cudnn_benchmark (off: the default; autotuning costs ~9 s per shape)",
    )
    d.add_argument(
        "--tp-iters",
        type=int,
        default=220,
        help="throughput runs' iterations (220: a 170-iteration window, steady for the compiled step "
        "replayed from CUDA graphs; eager 2-GPU scaling over 170 swung 1.71-2.16x, over 1,000 from "
        "iteration 1 (--tp-iters 1000 --tp-warmup 0) 1.99-2.02x)",
    )
    d.add_argument("--tp-warmup", type=int, default=50, help="iterations left out of the img/s window")
    d.add_argument("--eq-iters", type=int, default=300)
    d.add_argument("--eq-batch", type=int, default=8, help="per-GPU batch of the N-GPU equivalence run")
    d.add_argument("--compile", action="store_true", help="also measure throughput under torch.compile")
    d.add_argument("--compile-only", action="store_true", help="throughput under torch.compile only")
    d.add_argument(
        "--cudagraphs",
        action="store_true",
        help="compiled runs replay the network's forward and backward from CUDA graphs (train.cuda_graph)",
    )
    d.add_argument(
        "--compile-shapes",
        choices=COMPILE_SHAPES,
        default=Config().train.compile_shapes,
        help="compiled, several padded shapes: one symbolic graph (in pad-stride blocks or not) or one per "
        "bucket (train.compile_shapes)",
    )
    d.add_argument("--loaders", default="torch", help="comma-separated loaders to measure throughput with")
    d.add_argument("--skip-equivalence", action="store_true")
    d.add_argument("--skip-throughput", action="store_true")
    d.add_argument(
        "--profile",
        action="store_true",
        help="profile 10 iterations of each throughput run on rank 0 (GPU busy fraction, launches per step)",
    )
    d.add_argument(
        "--compile-cache",
        default="",
        metavar="FILE",
        help="compiled runs read and rewrite this file of compile artifacts (train.compile_cache)",
    )
    d.add_argument(
        "--compile-package",
        action="store_true",
        help="with --compile-cache: keep the compiled forward packaged in the file (train.compile_package)",
    )
    d.add_argument(
        "--profile-start",
        action="store_true",
        help="sample each throughput run's Python stack on rank 0 from its start to the end of its first "
        "step (the functions on the stack longest: where a warm start spends its time)",
    )
    d.add_argument(
        "--ddp-variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE,...",
        help="also run each N-GPU throughput run with these DistributedDataParallel arguments (booleans "
        "0/1), e.g. bucket_view=gradient_as_bucket_view=1,static_graph=1 (repeatable); the keys optimize_ddp "
        "(0, 1 or a mode: python_reducer) and compiled_autograd set torch._dynamo.config (compiled runs); "
        "grad_sync=ddp|after_backward sets train.grad_sync (default auto: after_backward on one node; DDP "
        "arguments imply ddp)",
    )
    d.add_argument("--only-variants", action="store_true", help="N-GPU runs with --ddp-variant options only")
    d.add_argument(
        "--torchrun-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to every torchrun launch (repeatable), e.g. --torchrun-arg=--numa-binding=node",
    )
    d.add_argument(
        "--concurrent-singles",
        action="store_true",
        help="also run N independent 1-GPU trainings at once (one per GPU): do ranks slow each other's host?",
    )
    d.add_argument(
        "--one-rank-ddp",
        action="store_true",
        help="also run 1 GPU wrapped in DDP (a process group of one): DDP's cost without communication",
    )
    w = sub.add_parser("worker", help="internal: one torchrun task")
    w.add_argument("--task", choices=["throughput", "equivalence", "evaluate"], required=True)
    w.add_argument("--force-ddp", action="store_true", help="train through DDP even on one rank")
    w.add_argument("--data", required=True)
    w.add_argument("--checkpoint", required=True)
    w.add_argument("--result", required=True)
    w.add_argument("--iters", type=int, default=90)
    w.add_argument("--warmup", type=int, default=30)
    w.add_argument("--batch-per-gpu", type=int, default=8)
    w.add_argument("--workers", type=int, default=8)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--compile", action="store_true")
    w.add_argument("--cudagraphs", action="store_true")
    w.add_argument("--compile-shapes", choices=COMPILE_SHAPES, default=Config().train.compile_shapes)
    w.add_argument("--compile-cache", default="")
    w.add_argument("--compile-package", action="store_true")
    w.add_argument("--loader", default="torch", choices=["torch", "dali"])
    w.add_argument("--profile", action="store_true")
    w.add_argument("--profile-start", action="store_true")
    w.add_argument("--jitter", default="800,800")
    w.add_argument("--cudnn", default="off")
    w.add_argument("--ddp-options", default="", help="KEY=0|1,... passed to DistributedDataParallel")
    args = ap.parse_args(
        sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] in ("run", "worker") else ["run", *sys.argv[1:]]
    )
    if args.mode == "worker":
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
