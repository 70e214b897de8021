"""``export(checkpoint, output, cfg)``: the one entry point; the format follows ``output``'s extension."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from retinaflow.config import Config, ExportConfig
from retinaflow.engine.checkpoint import load_checkpoint
from retinaflow.export.spec import EngineSpec, resolve


@dataclass
class Exported:
    """An exported engine: its file, what it was built as, and the device it was compiled for."""

    path: Path
    spec: EngineSpec
    device: str


def export(
    checkpoint: str | Path,
    output: str | Path,
    cfg: ExportConfig | None = None,
    device: str | None = None,
    precision_given: bool = True,
) -> Exported:
    """Export ``checkpoint`` to ``output`` (.onnx, .pt2, or .plan where TensorRT is installed).

    ``precision_given=False`` lets a .pt2 built for CUDA default to fp16 (fp32 elsewhere).
    """
    cfg = replace(cfg) if cfg is not None else ExportConfig()
    config = Config.from_dict(load_checkpoint(checkpoint)["config"])
    spec = resolve(output, cfg, config)  # validates before any slow work
    if spec.format == "onnx":
        from retinaflow.export.onnx import export_onnx

        path = export_onnx(checkpoint, output, cfg)
        return Exported(Path(path), spec, "cpu")
    if spec.format == "tensorrt":
        from retinaflow.export.tensorrt import export_plan

        return Exported(export_plan(checkpoint, output, cfg), spec, "cuda")
    from retinaflow.export.aoti import export_pt2

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not precision_given and dev.startswith("cuda"):
        cfg.precision = "fp16"
    path = export_pt2(checkpoint, output, cfg, dev)
    return Exported(Path(path), resolve(output, cfg, config), dev)
