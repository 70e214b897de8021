"""Learning-rate schedule and mixed-precision settings, as pure functions of the config."""

from __future__ import annotations

import bisect
import math

import torch

from retinaflow.config import TrainConfig
from retinaflow.errors import ConfigError


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """Linear warmup from ``lr * warmup_factor``, then (``lr_schedule``) step decay by ``gamma`` at each
    milestone, or a cosine from ``lr`` at the end of warmup to 0 at ``iters``.

    Warmup and milestones are scaled by ``cfg.schedule`` (ODTK's ``--schedule``). Being a pure
    function of the iteration, a resumed run needs no scheduler state.
    """
    warmup = cfg.scaled(cfg.warmup)
    if cfg.lr_schedule == "step":
        milestones = sorted(cfg.scaled(m) for m in cfg.milestones)
        lr = cfg.lr * cfg.gamma ** bisect.bisect_right(milestones, iteration)
    elif cfg.lr_schedule == "cosine":
        progress = min(1.0, max(0, iteration - warmup) / max(1, cfg.iters - warmup))
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"train.lr_schedule must be step or cosine, got {cfg.lr_schedule!r}")
    if iteration < warmup:
        alpha = iteration / warmup
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``fp32|fp16|bf16|auto`` on ``device`` (None = no autocast).

    ``auto`` is bf16 on GPUs that support it, fp16 on older GPUs and fp32 on the CPU.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    table = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise ConfigError(f"precision must be fp32, fp16, bf16 or auto, not {precision!r}")
    return table[precision]
