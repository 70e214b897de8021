"""Which data loader a run uses (``data.loader`` / ``infer.loader``) and building it.

"auto" means DALI when the run is on a CUDA device and DALI is installed, the torch DataLoader otherwise;
the choice is logged once per process. Both loaders take the same batches (``sampler.train_batches`` /
``sampler.eval_batches``) and yield :class:`~retinaflow.data.batch.Batch`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import DataConfig
from retinaflow.data.coco import CocoDataset
from retinaflow.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

LOADERS = ("auto", "dali", "torch")
DALI_HINT = "pip install retinaflow[dali]"
_announced: set[str] = set()


def dali_installed() -> bool:
    """True when ``nvidia.dali`` can be imported (checked without importing it)."""
    return (
        importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    )


def resolve_loader(name: str, device: torch.device) -> str:
    """The loader ("dali" or "torch") that ``name`` means on ``device``; raises if unknown or missing."""
    if name not in LOADERS:
        raise ConfigError(f"data.loader must be one of {', '.join(LOADERS)}, got {name!r}")
    if name == "auto":
        name = "dali" if device.type == "cuda" and dali_installed() else "torch"
    elif name == "dali" and not dali_installed():
        raise MissingDependency(f"--loader dali needs NVIDIA DALI: {DALI_HINT}")
    if name not in _announced:
        _announced.add(name)
        log.info("data loader: %s", name)
    return name


def build_train(
    data: DataConfig, batch: int, seed: int, rank: int, world_size: int, start: int, device: torch.device
) -> tuple[Any, CocoDataset]:
    """Endless training batches for ``rank`` from the loader ``data.loader`` selects (see module doc)."""
    if resolve_loader(data.loader, device) == "dali":
        from retinaflow.data.dali import build_dali_train_loader

        return build_dali_train_loader(data, batch, seed, rank, world_size, start, device)
    from retinaflow.data.loader import build_train_loader

    return build_train_loader(data, batch, seed, rank, world_size, start)


def build_eval(
    images: str | Path,
    annotations: str | Path,
    data: DataConfig,
    batch: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> tuple[Any, CocoDataset]:
    """This rank's evaluation batches from the loader ``data.loader`` selects."""
    if resolve_loader(data.loader, device) == "dali":
        from retinaflow.data.dali import build_dali_eval_loader

        return build_dali_eval_loader(images, annotations, data, batch, rank, world_size, device)
    from retinaflow.data.loader import build_eval_loader

    return build_eval_loader(images, annotations, data, batch, rank, world_size)
