"""What every CUDA-kernel test module of tests/ops starts with: ``pytestmark = CUDA_KERNEL_TESTS``.

Marks the module ``gpu``, skips it without a CUDA device and loads the kernels once per module (fixture
``cuda_kernels`` in tests/ops/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

CUDA_KERNEL_TESTS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("cuda_kernels"),
]
