"""The optimizer that ``train.optimizer`` names: SGD with momentum (paper, ODTK) or AdamW.

AdamW leaves 1-D parameters (biases, norm affines) undecayed, as is usual for it; SGD decays everything
as ODTK does. The learning rate itself is set every step by ``schedule.lr_at``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from retinaflow.config import TrainConfig
from retinaflow.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the trainable ``params`` with ``cfg.lr``, ``momentum``, ``weight_decay``."""
    params = [p for p in params if p.requires_grad]
    # On GPUs the fused implementations update every tensor in a few kernels (the foreach ones launch
    # several per operation): the training step is host-bound, so fewer launches is speed.
    fused = bool(params) and all(p.is_cuda for p in params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None
        )
    if cfg.optimizer == "adamw":
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
