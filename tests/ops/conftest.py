from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cuda_kernels() -> None:
    """The retinaflow CUDA kernels built (or taken from the cache) and registered."""
    from retinaflow.ops import _ext

    _ext.load()
