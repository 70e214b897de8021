"""CudaGraphRunner input checks and fastest_capture's selection (CPU, with a stand-in capture); capture
and replay are tested on the GPU (test_decode_gpu.py, tests/export/test_aoti.py)."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from retinaflow.errors import ConfigError
from retinaflow.ops.graph import CudaGraphRunner, capture_graph, fastest_capture


def test_cpu_inputs_are_rejected_before_any_capture():
    calls = []
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        CudaGraphRunner(lambda x: calls.append(x), [torch.zeros(2)])
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        CudaGraphRunner(lambda: None, [])
    assert calls == []


class FakeRunner:
    """A stand-in graph: remembers the thread it was captured on and how fast it "replays"."""

    def __init__(self, ms: float) -> None:
        self.ms, self.thread = ms, threading.current_thread()

    def __call__(self, *inputs: torch.Tensor) -> float:
        return self.ms


def _ended(thread: threading.Thread) -> bool:
    thread.join(timeout=5)
    return not thread.is_alive()


def test_each_trial_is_captured_on_its_own_thread_and_the_fastest_is_kept():
    speeds = iter([2.15, 2.06, 2.11, 2.09])
    captured: list[FakeRunner] = []

    def capture(fn, inputs):
        captured.append(FakeRunner(next(speeds)))
        return captured[-1]

    timed: list[int] = []

    def timer(run, replays):  # a fake replay returns its own speed
        timed.append(replays)
        return run()

    winner, medians = fastest_capture(
        lambda x: x, [torch.zeros(1)], 4, replays=7, capture=capture, timer=timer
    )
    assert medians == [2.15, 2.06, 2.11, 2.09]
    assert winner is captured[1]
    assert len({r.thread.ident for r in captured}) == 4
    assert all(r.thread is not threading.main_thread() for r in captured)
    assert timed == [7] * 12  # 3 interleaved rounds of 4 graphs
    assert all(_ended(r.thread) for i, r in enumerate(captured) if i != 1)
    # the winner's thread (its cuDNN plans) lives as long as the runner
    keeper = winner.thread
    time.sleep(0.05)
    assert keeper.is_alive()
    del winner, captured[:]
    gc.collect()
    assert _ended(keeper)


def test_a_failed_capture_is_raised_here_and_ends_every_trial_thread():
    threads: list[threading.Thread] = []

    def capture(fn, inputs):
        threads.append(threading.current_thread())
        if len(threads) == 2:
            raise RuntimeError("capture failed")
        return FakeRunner(1.0)

    with pytest.raises(RuntimeError, match="capture failed"):
        fastest_capture(lambda x: x, [torch.zeros(1)], 3, capture=capture, timer=lambda run, n: 1.0)
    assert len(threads) == 2 and all(_ended(t) for t in threads)


def test_capture_graph_tries_several_only_when_cudnn_autotunes(monkeypatch):
    """Without autotuning every trial would pick the same algorithms: one capture, on this thread (the
    real runner then refuses CPU inputs here, on the main thread); with it, on trial threads."""
    seen: list[threading.Thread] = []

    class Recording(CudaGraphRunner):
        def __init__(self, fn, inputs):
            seen.append(threading.current_thread())
            super().__init__(fn, inputs)

    monkeypatch.setattr("retinaflow.ops.graph.CudaGraphRunner", Recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        capture_graph(lambda x: x, [torch.zeros(1)], 3)
    assert seen == [threading.main_thread()]
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        capture_graph(lambda x: x, [torch.zeros(1)], 3)
    assert len(seen) == 2 and seen[1] is not threading.main_thread()
