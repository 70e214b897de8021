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
