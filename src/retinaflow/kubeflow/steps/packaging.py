"""The export_onnx and build_engine steps."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaflow.errors import ConfigError, MissingDependency
from retinaflow.kubeflow.steps.common import reports_failure

log = logging.getLogger(__name__)

ENGINE_FILE = "model.plan"
BUILD_FILE = "build.json"


@dataclass
class Exported:
    path: Path
    size: int
    opset: int

    def metadata(self) -> dict[str, Any]:
        return {"size": self.size, "opset": self.opset, "format": "onnx"}


def export_size(checkpoint: str | Path, size: int) -> int:
    """``size`` or, when 0, the checkpoint's inference ``max_size`` padded to ``infer.pad_stride`` (covers
    every evaluation batch). An explicit size must be a multiple of 32, the network's stride."""
    from retinaflow.config import Config
    from retinaflow.engine.checkpoint import load_checkpoint

    if size < 0 or size % 32:
        raise ConfigError(f"export size must be 0 or a positive multiple of 32, got {size}")
    if size:
        return size
    config = Config.from_dict(load_checkpoint(checkpoint)["config"])
    stride = config.infer.pad_stride
    longest = max(config.infer.max_size, config.infer.resize)
    return -(-longest // stride) * stride


@reports_failure("export-onnx")
def export_model(checkpoint: str | Path, output: str | Path, opset: int, size: int) -> Exported:
    """Export ``checkpoint`` to ONNX at ``output`` (square input, dynamic batch); see export_onnx."""
    from retinaflow.config import ExportConfig
    from retinaflow.export.onnx import export_onnx

    side = export_size(checkpoint, size)
    cfg = ExportConfig(opset=opset, height=side, width=side)
    path = export_onnx(checkpoint, output, cfg)
    return Exported(path=Path(path), size=side, opset=opset)


@dataclass
class EngineResult:
    built: bool
    reason: str
    path: Path | None = None

    def metadata(self) -> dict[str, Any]:
        return {"built": self.built, "reason": self.reason}


@reports_failure("build-engine")
def build_trt_engine(
    checkpoint: str | Path, out_dir: str | Path, enabled: bool, precision: str
) -> EngineResult:
    """Build ``out_dir/model.plan`` with retinaflow's TensorRT export; skip (with the reason) without it.

    ``out_dir/build.json`` records ``built`` and ``reason`` either way, so later steps and people can
    tell a skipped build from a missing one. Errors of a real build are raised, never swallowed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = _build(Path(checkpoint), out, enabled, precision)
    if not result.built:
        log.warning("TensorRT engine not built: %s", result.reason)
    (out / BUILD_FILE).write_text(json.dumps({"built": result.built, "reason": result.reason}))
    return result


def _build(checkpoint: Path, out: Path, enabled: bool, precision: str) -> EngineResult:
    if not enabled:
        return EngineResult(False, "disabled by the pipeline parameter build_trt_engine=false")
    from retinaflow.config import ExportConfig
    from retinaflow.export.tensorrt import export_plan

    try:
        path = export_plan(checkpoint, out / ENGINE_FILE, ExportConfig(precision=precision))
    except MissingDependency as exc:
        return EngineResult(False, str(exc))
    return EngineResult(True, f"built with precision {precision}", Path(path))


def engine_file(engine_dir: str | Path) -> Path | None:
    """The engine of a build_engine artifact folder, or None when the build was skipped."""
    path = Path(engine_dir) / ENGINE_FILE
    return path if path.is_file() else None
