"""A tiny checkpoint (ResNet-18, 32-channel FPN, one head conv, 3 classes) whose random head scores
straddle the score threshold, so engines have detections to compare."""

from __future__ import annotations

import pytest
import torch

from retinaflow.config import Config
from retinaflow.engine.checkpoint import save_checkpoint
from retinaflow.model.norm import FrozenBatchNorm2d
from retinaflow.model.retinanet import build_model


def tiny_detector_config() -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.num_classes, cfg.model.fpn_channels, cfg.model.head_convs = (
        "resnet18",
        3,
        32,
        1,
    )
    cfg.model.prior = 0.05  # initial scores around the 0.05 threshold: some detections, not all
    cfg.class_names = ["a", "b", "c"]
    cfg.infer.resize = cfg.infer.max_size = 128  # default export size: 128x128
    cfg.data.workers = 0
    return cfg


def write_tiny_checkpoint(path, head_norm: str = "gn"):
    """(path, model): a tiny checkpoint at ``path`` and the RetinaNet it holds (eval mode), with non-trivial
    frozen BN statistics, and with ``head_norm="bn"`` per-level head statistics of their own."""
    cfg = tiny_detector_config()
    cfg.model.head_norm = head_norm
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for m in model.modules():  # non-trivial frozen statistics, so folding them into the convs shows
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    if head_norm == "bn":  # each level's statistics, as training gives them
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(2, 3, 128, 128) * 255)
    save_checkpoint(
        path,
        {
            "arch": model.arch,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "class_names": cfg.class_names,
            "category_ids": [1, 2, 3],
            "iteration": 0,
        },
    )
    return path, model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(path, model): the checkpoint and the RetinaNet it holds (non-trivial frozen BN statistics)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pth")


@pytest.fixture(scope="session")
def tiny_bn_head_checkpoint(tmp_path_factory):
    """(path, model): as ``tiny_checkpoint`` with ``model.head_norm=bn`` (per-level head statistics)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "bn.pth", head_norm="bn")
