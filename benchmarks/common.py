"""Shared helpers for the GPU benchmarks: timing with CUDA events, environment description, JSON output."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import torchvision

    return {
        "device": dev,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls after ``warmup`` (events on CUDA)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time

        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


KERNEL_CLASSES = (  # (class, substrings of kernel names), first match wins
    ("triton", ("triton",)),  # inductor's fused kernels (bias, ReLU, adds, norms, pre-processing)
    ("nccl", ("nccl",)),
    ("retinaflow ops", ("retinaflow", "decode", "nms", "score", "topk", "select", "rf::")),
    ("convolutions", ("conv", "xmma", "cudnn", "implicit", "gemm", "sm90", "cutlass", "nhwc", "nchw")),
)


def gpu_kernels(prof: Any, calls: int, top: int = 20) -> dict[str, Any]:
    """GPU milliseconds per call (or step) of a ``torch.profiler`` run over ``calls`` calls: in all, per
    kernel class (:data:`KERNEL_CLASSES`, else "other") and for the ``top`` kernels."""
    per_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0 and event.device_type.name == "CUDA":
            per_kernel[event.key] = per_kernel.get(event.key, 0.0) + event.device_time_total / 1e3 / calls
    classes: dict[str, float] = {}
    for name, ms in per_kernel.items():
        low = name.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")
        classes[cls] = round(classes.get(cls, 0.0) + ms, 3)
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {
        "gpu_ms_per_call": round(sum(per_kernel.values()), 3),
        "classes_ms": classes,
        "top_ms": {k[:90]: round(v, 3) for k, v in ranked},
    }


def emit(name: str, results: dict[str, Any]) -> None:
    print(json.dumps({"benchmark": name, **environment(), **results}, indent=2))


_children: list[subprocess.Popen[bytes]] = []


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(cmd, **kwargs)``, stopped with this process by ``stop_children_on_signal``. In a
    session of its own, so that ``timeout``'s signal to this group reaches only this process, which then
    finds the child's whole tree before any of it exits."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _children.append(proc)
    return proc


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc's parent links, across sessions (torchrun starts each rank in
    a session of its own, so no process group holds them all)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def stop_children_on_signal(grace_s: float = 10.0) -> None:
    """On SIGTERM (``timeout``'s) or Ctrl-C: SIGTERM to every running child and everything below it, SIGKILL
    to what is left after ``grace_s``, then exit 128 + signal.

    Without this a driver stopped by ``timeout`` left training ranks on both GPUs, and the next device call
    measured beside them (sixteenth session: the engine's batch-1 latency 2.5x its own)."""

    def stop(signum: int, frame: object) -> None:
        tree = [pid for p in _children if p.poll() is None for pid in (p.pid, *_descendants(p.pid))]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in tree:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(_running(pid) for pid in tree):
                time.sleep(0.1)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
