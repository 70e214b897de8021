"""CudaGraphRunner input checks (CPU); capture and replay are tested on the GPU (test_decode_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from retinaflow.errors import ConfigError
from retinaflow.ops.graph import CudaGraphRunner


def test_cpu_inputs_are_rejected_before_any_capture():
    calls = []
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        CudaGraphRunner(lambda x: calls.append(x), [torch.zeros(2)])
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        CudaGraphRunner(lambda: None, [])
    assert calls == []
