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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from retinaflow.errors import ConfigError


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
