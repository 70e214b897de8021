from __future__ import annotations

import pytest
import torch

from retinaflow.config import TrainConfig
from retinaflow.engine.schedule import autocast_dtype, lr_at
from retinaflow.errors import ConfigError


def test_warmup_then_steps():
    cfg = TrainConfig(
        lr=0.01, lr_schedule="step", warmup=100, warmup_factor=0.1, milestones=(1000, 2000), gamma=0.1
    )
    assert lr_at(0, cfg) == pytest.approx(0.001)
    assert lr_at(50, cfg) == pytest.approx(0.01 * (0.1 * 0.5 + 0.5))
    assert lr_at(100, cfg) == pytest.approx(0.01)
    assert lr_at(999, cfg) == pytest.approx(0.01)
    assert lr_at(1000, cfg) == pytest.approx(0.001)
    assert lr_at(2500, cfg) == pytest.approx(0.0001)


def test_schedule_scales_warmup_and_milestones():
    cfg = TrainConfig(lr=0.01, lr_schedule="step", warmup=100, milestones=(1000,), schedule=2.0)
    assert lr_at(150, cfg) < 0.01
    assert lr_at(1500, cfg) == pytest.approx(0.01)
    assert lr_at(2000, cfg) == pytest.approx(0.001)


def test_autocast_dtypes():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is torch.float16
    with pytest.raises(ConfigError, match="precision"):
        autocast_dtype("int8", cpu)


def test_warmup_then_cosine_to_zero():
    cfg = TrainConfig(lr=0.01, iters=1100, warmup=100, warmup_factor=0.1, lr_schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.001)
    assert lr_at(100, cfg) == pytest.approx(0.01)
    assert lr_at(600, cfg) == pytest.approx(0.005)
    assert lr_at(1100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(i, cfg) >= lr_at(i + 50, cfg) for i in range(100, 1100, 50))
    with pytest.raises(ConfigError, match="lr_schedule"):
        lr_at(0, TrainConfig(lr_schedule="linear"))
