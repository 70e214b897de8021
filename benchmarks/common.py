"""Shared helpers for the GPU benchmarks: timing with CUDA events, environment description, JSON output."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from collections.abc import Callable
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


def emit(name: str, results: dict[str, Any]) -> None:
    print(json.dumps({"benchmark": name, **environment(), **results}, indent=2))
