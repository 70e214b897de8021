"""Which implementation an op runs: the CUDA kernels or the pure-PyTorch reference.

``backend``: ``"auto"`` (default: kernels for CUDA tensors if they can be loaded), ``"cuda"`` (kernels or
:class:`~retinaflow.errors.MissingDependency`), ``"reference"``. The environment variable
``RETINAFLOW_OPS_BACKEND`` changes the default. Shared by the post-processing ops (:mod:`.boxes`) and
anchor matching (:mod:`.matching`).
"""

from __future__ import annotations

import os

import torch

from retinaflow.errors import ConfigError
from retinaflow.ops import _ext

BACKENDS = ("auto", "cuda", "reference")


def backend_name(backend: str | None) -> str:
    """``backend``, or the environment's default; raises ConfigError for an unknown name."""
    name = backend or os.environ.get("RETINAFLOW_OPS_BACKEND", "auto")
    if name not in BACKENDS:
        raise ConfigError(f"ops backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def use_kernels(t: torch.Tensor, backend: str | None) -> bool:
    """True if an op on ``t`` should run the CUDA kernels under ``backend``."""
    name = backend_name(backend)
    if name == "reference":
        return False
    if name == "cuda":
        if t.device.type != "cuda":
            raise ConfigError(f"ops backend 'cuda' needs CUDA tensors, got tensors on {t.device}")
        _ext.load()
        return True
    return t.device.type == "cuda" and _ext.available()
