"""Exponential moving average of the weights (``train.ema``), for evaluation and export.

The average lives in a copy of the network, updated after every optimizer step with ``torch._foreach``
ops on the device (no host sync, one kernel per few tensors): ``avg = avg + (1 - d) * (w - avg)`` with
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early, random weights fade fast. Buffers
(BN statistics) are copied. Checkpoints keep the raw weights under ``model`` (exact resume) and the
average under ``ema``; :func:`inference_weights` picks the average for evaluation, predict and export.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from retinaflow.errors import ConfigError


class EMA:
    """``module``: the averaged copy (eval mode, no gradients). ``update(model)`` after each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema must be in (0, 1) to average (0 turns it off), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ours: list[torch.Tensor] = [p for p in self.module.parameters() if p.is_floating_point()]
        theirs = [p.detach() for p in model.parameters() if p.is_floating_point()]
        return ours, theirs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (same architecture as at construction)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ours, theirs = self._pairs(model)
        torch._foreach_lerp_(ours, theirs, 1.0 - decay)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, [b.detach() for b in model.buffers()])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def inference_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to evaluate or export from a checkpoint dict: the EMA's if it has one, else ``model``."""
    ema = checkpoint.get("ema")
    return ema["model"] if ema else checkpoint["model"]
