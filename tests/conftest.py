"""Shared fixtures: a small deterministic synthetic dataset and a tiny training config."""

from __future__ import annotations

from pathlib import Path

import pytest

from retinaflow.config import Config


def pytest_collection_modifyitems(config, items) -> None:
    """``gpu`` tests skip without a CUDA device, ``tensorrt`` tests without TensorRT (each says why)."""
    import importlib.util

    import torch

    missing = {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA GPU (runs on the GPU machine)",
        "tensorrt": None
        if importlib.util.find_spec("tensorrt")
        else "needs TensorRT (runs in dockerfiles/export.Dockerfile)",
    }
    for item in items:
        for marker, reason in missing.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """30 small (96-128 px) images of the synthetic shapes (train + val), generated once per test session."""
    from retinaflow.data.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth_small")
    return generate(
        SynthConfig(out=out, images=30, seed=1, val_fraction=0.2, image_size=(96, 128), object_size=(16, 64))
    )


def tiny_config(paths, iters: int = 4) -> Config:
    """A network and schedule small enough for a few CPU iterations per second."""
    cfg = Config.load("synthetic_cpu")
    cfg.model.fpn_channels = 32
    cfg.model.head_convs = 1
    cfg.train.backbone_weights = None  # machinery tests: random init, runs without the weights package
    cfg.model.norm, cfg.model.head_norm = "frozen_bn", "none"  # ... of the ODTK network all the same
    cfg.data.images, cfg.data.annotations = str(paths.train_images), str(paths.train_annotations)
    cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 128, 128, (96, 128)
    cfg.data.workers = 0
    t = cfg.train
    t.iters, t.batch, t.warmup, t.milestones = iters, 2, 2, (iters,)
    t.checkpoint_every, t.log_every, t.val_every = 2, 1, 0
    cfg.infer.resize, cfg.infer.max_size, cfg.infer.batch = 128, 128, 4
    return cfg
