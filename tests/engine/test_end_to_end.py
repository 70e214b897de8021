"""Train on a small synthetic set on the CPU and reach a stated mAP (not just "it runs").

MobileNetV2-FPN from the offline ImageNet weights, 120 images of 112-144 px, 200 iterations at batch 8:
measured val mAP 0.117 / AP50 0.203 (2026-11-25, 2-core CPU). The assertion leaves room for thread-level
nondeterminism; an untrained model scores ~0.0.
"""

from __future__ import annotations

import json

import pytest

from retinaflow.config import Config
from retinaflow.data.synthetic import SynthConfig, generate
from retinaflow.engine.evaluate import evaluate_detections
from retinaflow.engine.infer import infer
from retinaflow.engine.train import train

MIN_MAP, MIN_AP50 = 0.06, 0.12


@pytest.mark.slow
def test_training_on_synthetic_shapes_reaches_the_stated_map(tmp_path):
    paths = generate(
        SynthConfig(out=tmp_path / "data", images=120, seed=0, image_size=(112, 144), object_size=(20, 72))
    )
    cfg = Config.load("synthetic_cpu")
    cfg.data.images, cfg.data.annotations = str(paths.train_images), str(paths.train_annotations)
    cfg.data.resize, cfg.data.max_size, cfg.data.jitter, cfg.data.workers = 128, 128, (112, 128), 0
    cfg.infer.resize, cfg.infer.max_size = 128, 128
    t = cfg.train
    t.iters, t.warmup, t.milestones, t.checkpoint_every = 200, 30, (160,), 10000
    checkpoint = train(cfg, tmp_path / "model.pth")
    result = infer(
        checkpoint, paths.val_images, tmp_path / "det.json", cfg.infer, paths.val_annotations, device="cpu"
    )
    assert result is not None
    assert result.map >= MIN_MAP, result.stats
    assert result.stats["AP50"] >= MIN_AP50, result.stats
    # the written detections evaluate to the same numbers through the CLI's path
    again = evaluate_detections(paths.val_annotations, json.loads((tmp_path / "det.json").read_text()))
    assert again.map == pytest.approx(result.map, abs=1e-6)
