from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from retinaflow.config import Config, TrainConfig
from retinaflow.engine.optim import build_optimizer
from retinaflow.errors import ConfigError


def _net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    net[0].requires_grad_(False)
    return net


def test_the_default_is_the_measured_best_recipe_and_odtk_keeps_sgd() -> None:
    t = TrainConfig()
    assert (t.optimizer, t.lr, t.weight_decay, t.lr_schedule, t.clip_grad) == (
        "adamw",
        5e-4,
        0.05,
        "cosine",
        10.0,
    )
    assert isinstance(build_optimizer(_net().parameters(), t), torch.optim.AdamW)
    odtk = Config.load(Path(__file__).parents[2] / "configs" / "retinanet_odtk.yaml").train
    assert (odtk.optimizer, odtk.lr, odtk.weight_decay, odtk.lr_schedule, odtk.clip_grad) == (
        "sgd",
        0.01,
        1e-4,
        "step",
        0.0,
    )


def test_sgd_skips_frozen_parameters() -> None:
    cfg = TrainConfig(optimizer="sgd", lr=0.02, momentum=0.8, weight_decay=1e-4)
    opt = build_optimizer(_net().parameters(), cfg)
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups
    assert len(group["params"]) == 4 and group["momentum"] == 0.8 and group["weight_decay"] == 1e-4


def test_adamw_does_not_decay_biases_and_norms() -> None:
    opt = build_optimizer(_net().parameters(), TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert [p.ndim for p in decayed["params"]] == [4] and decayed["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 3
    assert plain["weight_decay"] == 0.0


def test_unknown_optimizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        build_optimizer(_net().parameters(), TrainConfig(optimizer="lamb"))
