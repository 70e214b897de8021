"""Capture a fixed-shape CUDA pipeline (pre-processing + network + post-processing) as one CUDA graph.

Recipe (what ``retinaflow infer --cuda-graph`` needs)::

    def pipeline(images_u8):              # (B, H, W, 3) uint8 on the GPU, fixed shape
        x = pad_to_stride(images_u8)       # any torch ops, no host synchronisation
        cls, box = model(x)
        return postprocess(cls, box, anchors, sizes, cfg)   # CUDA kernels: no sync inside

    run = CudaGraphRunner(pipeline, [example_images])
    dets = run(images)                     # copies into the static input, replays, returns Detections

Everything the pipeline reads besides its inputs (model weights, anchors, sizes) must stay at the same
addresses between calls. The returned tensors are the graph's static outputs: they are overwritten by
the next call, so copy (or move to the host) what you keep.

With cuDNN autotuning on, :func:`fastest_capture` captures the pipeline after several independent
autotunings and keeps the fastest graph (batch-1 latency, where one autotuning's noise shows).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from retinaflow.errors import ConfigError

log = logging.getLogger(__name__)


class CudaGraphRunner:
    """``fn(*inputs)`` captured once (after ``warmup`` eager calls on a side stream), then replayed.

    example_inputs: CUDA tensors with the shapes, dtypes and memory formats of every later call.
    """

    def __init__(
        self, fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor], warmup: int = 3
    ) -> None:
        if not example_inputs or any(t.device.type != "cuda" for t in example_inputs):
            raise ConfigError("CUDA-graph capture needs CUDA tensors as inputs")
        self.static_inputs = [t.clone() for t in example_inputs]
        stream = torch.cuda.Stream(device=self.static_inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # first calls build kernels, pick cuDNN algorithms, fill the cache
            for _ in range(max(warmup, 1)):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.static_inputs):
            raise ConfigError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for dst, src in zip(self.static_inputs, inputs, strict=True):
            if src.shape != dst.shape:
                raise ConfigError(f"CUDA graph captured for shape {tuple(dst.shape)}, got {tuple(src.shape)}")
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


Capture = Callable[[Callable[..., Any], Sequence[torch.Tensor]], Any]


def replay_ms(run: Callable[[], Any], replays: int) -> float:
    """Milliseconds per call of ``run`` (a graph replay) over ``replays`` calls, timed by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()  # the first replay after a capture uploads the graph
    start.record()
    for _ in range(replays):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


class _Trial(threading.Thread):
    """One capture on a thread of its own, which then waits (keeping its cuDNN plans) until released."""

    def __init__(self, capture: Capture, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> None:
        super().__init__(name="retinaflow-graph-trial", daemon=True)
        self.capture, self.fn, self.inputs = capture, fn, inputs
        self.runner: Any = None
        self.error: BaseException | None = None
        self.captured, self.release = threading.Event(), threading.Event()

    def run(self) -> None:
        on = torch.cuda.device(self.inputs[0].device) if self.inputs[0].is_cuda else contextlib.nullcontext()
        try:
            with on, torch.no_grad():
                self.runner = self.capture(self.fn, self.inputs)
        except BaseException as exc:  # re-raised on the caller's thread
            self.error = exc
        finally:  # a waiting thread must not keep what it captured from alive
            self.capture = self.fn = None  # type: ignore[assignment]
            self.inputs = ()
            self.captured.set()
        self.release.wait()


def fastest_capture(
    fn: Callable[..., Any],
    example_inputs: Sequence[torch.Tensor],
    trials: int,
    replays: int = 10,
    rounds: int = 3,
    capture: Capture | None = None,
    timer: Callable[[Callable[[], Any], int], float] = replay_ms,
) -> tuple[Any, list[float]]:
    """``capture(fn, example_inputs)`` done ``trials`` times, each on a new thread, and the fastest kept.

    torch keeps cuDNN's autotuned algorithms per thread (``Conv_v8.cpp``), so with
    ``torch.backends.cudnn.benchmark`` each thread autotunes again before its capture. One autotuning
    times each algorithm once, and its noise decides between near-equal kernels: an R50-FPN batch-1
    engine's graph replays in 2.06-2.16 ms on one H200 depending on the autotuning, the same to 0.005 ms
    between captures of one autotuning (docs/PERFORMANCE.md, twenty-sixth session). Each graph is timed
    in ``rounds`` interleaved rounds of ``replays`` replays (:func:`replay_ms`); the one with the lowest
    median is returned with every trial's median ms. ``capture`` (default :class:`CudaGraphRunner`) and
    ``timer`` stand in for the GPU in tests. The winner's thread waits as long as its runner
    lives (its cuDNN plans stay alive with it); the others end, and their graphs are freed.
    """
    capture = capture or CudaGraphRunner
    trials = max(trials, 1)
    threads: list[_Trial] = []
    try:
        for _ in range(trials):  # one after another: a capture must not overlap other work on the GPU
            trial = _Trial(capture, fn, example_inputs)
            threads.append(trial)
            trial.start()
            trial.captured.wait()
            if trial.error is not None:
                raise trial.error
        runners = [t.runner for t in threads]
        samples: list[list[float]] = [[] for _ in runners]
        for _ in range(rounds):  # interleaved: a slower moment of the GPU falls on every graph alike
            for runner, times in zip(runners, samples, strict=True):
                times.append(timer(functools.partial(runner, *example_inputs), replays))
        medians = [statistics.median(times) for times in samples]
        best = medians.index(min(medians))
        winner, keeper = runners[best], threads[best]
        del runners
        keeper.runner = None
        weakref.finalize(winner, keeper.release.set)
        threads.remove(keeper)
        return winner, medians
    finally:
        for trial in threads:
            trial.runner = None
            trial.release.set()


def capture_graph(fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor], trials: int) -> Any:
    """A :class:`CudaGraphRunner` of ``fn``: the fastest of ``trials`` captures when cuDNN autotunes
    (:func:`fastest_capture`, logged), else one capture on this thread (the trials would all be alike)."""
    if trials <= 1 or not torch.backends.cudnn.benchmark:
        return CudaGraphRunner(fn, example_inputs)
    t0 = time.perf_counter()
    runner, medians = fastest_capture(fn, example_inputs, trials)
    log.info(
        "CUDA graph for input %s: fastest of %d autotuned captures, %.3f ms a replay (all: %s ms; %.1f s)",
        tuple(example_inputs[0].shape),
        trials,
        min(medians),
        ", ".join(f"{m:.3f}" for m in medians),
        time.perf_counter() - t0,
    )
    return runner
