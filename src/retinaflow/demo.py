"""The embedded default job: synthesize a dataset, train a small detector on the CPU, evaluate, export.

``make demo`` runs the Kubeflow pipeline locally when the pipeline extras are installed (that pipeline
wraps these same steps); this module is the core-only version, usable on any machine with torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from retinaflow.config import Config
from retinaflow.engine.callbacks import EvalResult

log = logging.getLogger(__name__)

DEMO_IMAGES = 240


def demo_config(images: str, annotations: str, val_images: str, val_annotations: str) -> Config:
    """The ``synthetic_cpu`` preset (a detector small enough for 2 CPU cores) pointed at the data."""
    cfg = Config.load("synthetic_cpu")
    cfg.data.images, cfg.data.annotations = images, annotations
    cfg.data.val_images, cfg.data.val_annotations = val_images, val_annotations
    return cfg


def run_demo(output: Path, iters: int | None = None, images: int = DEMO_IMAGES) -> EvalResult:
    """Run the whole job into ``output``; returns the validation result of the trained model."""
    from retinaflow.data.synthetic import SynthConfig, generate
    from retinaflow.engine.evaluate import render_table, write_report
    from retinaflow.engine.infer import infer
    from retinaflow.engine.train import train
    from retinaflow.export.onnx import export_onnx

    output.mkdir(parents=True, exist_ok=True)
    paths = generate(SynthConfig(out=output / "data", images=images, seed=0))
    cfg = demo_config(
        str(paths.train_images),
        str(paths.train_annotations),
        str(paths.val_images),
        str(paths.val_annotations),
    )
    if iters is not None:
        cfg.train.iters = iters
        cfg.train.milestones = (int(iters * 0.75),)
        cfg.train.warmup = min(cfg.train.warmup, max(1, iters // 5))
    cfg.dump(output / "config.yaml")
    checkpoint = train(cfg, output / "model.pth")
    result = infer(
        checkpoint,
        paths.val_images,
        output / "detections.json",
        cfg.infer,
        paths.val_annotations,
        device="cpu",
    )
    assert result is not None
    write_report(result, output / "eval.json")
    cfg.export.height = cfg.export.width = 256
    onnx_path = export_onnx(checkpoint, output / "model.onnx", cfg.export)
    print(render_table(result))
    print(f"mAP (val, IoU .50:.95): {result.map:.4f}   AP50: {result.stats['AP50']:.4f}")
    for name, path in (
        ("config", output / "config.yaml"),
        ("checkpoint", checkpoint),
        ("detections", output / "detections.json"),
        ("report", output / "eval.json"),
        ("onnx", onnx_path),
    ):
        print(f"{name:>11}: {path}")
    return result
