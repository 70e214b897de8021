from __future__ import annotations

import pytest
import torch
from torch import nn

from retinaflow.engine.ema import EMA, inference_weights
from retinaflow.errors import ConfigError


def test_average_follows_the_ramped_decay_and_copies_buffers() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)  # type: ignore[union-attr]
    ema.update(model)  # n=1: d = min(0.5, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.module[0].weight, d * start + (1 - d) * (start + 1))
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), 3.0))
    for _ in range(20):
        ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, start + 1, atol=1e-5, rtol=0)  # converged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_state_round_trip_and_inference_weights() -> None:
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    ema.update(model)
    other = EMA(nn.Linear(2, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    torch.testing.assert_close(other.module.weight, ema.module.weight)
    ckpt = {"model": {"w": torch.zeros(1)}, "ema": {"model": {"w": torch.ones(1)}}}
    assert inference_weights(ckpt)["w"].item() == 1.0
    assert inference_weights({**ckpt, "ema": None})["w"].item() == 0.0
    with pytest.raises(ConfigError, match=r"train\.ema"):
        EMA(model, decay=1.0)
