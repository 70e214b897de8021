"""The evaluate step: COCO mAP of the PyTorch model and of its ONNX export, and the export-drop gate.

ODTK users met a silent 0.337 → 0.291 mAP drop after export; here the pipeline stops instead: the
step fails when the ONNX Runtime mAP is more than ``max_drop`` (absolute AP) below PyTorch's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinaflow.errors import ConfigError, RetinaflowError
from retinaflow.kubeflow.steps.common import local_input, reports_failure
from retinaflow.kubeflow.steps.data import load_manifest

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


class ExportDegraded(RetinaflowError):
    """The exported model's mAP is further below the PyTorch model's than the pipeline allows."""


@dataclass
class EvalSummary:
    """The 12 COCO statistics of both models (by name: AP, AP50, ... ARl) and the gate's inputs."""

    pytorch: dict[str, float]
    onnx: dict[str, float]
    max_drop: float
    per_class: dict[str, float] = field(default_factory=dict)

    @property
    def map(self) -> float:
        return self.pytorch["AP"]

    @property
    def onnx_map(self) -> float:
        return self.onnx["AP"]

    @property
    def drop(self) -> float:
        return self.map - self.onnx_map

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop

    def to_dict(self) -> dict[str, Any]:
        return {
            "pytorch": self.pytorch,
            "onnx": self.onnx,
            "per_class": self.per_class,
            "map": self.map,
            "onnx_map": self.onnx_map,
            "export_drop": self.drop,
            "max_export_drop": self.max_drop,
            "passed": self.passed,
        }

    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if not isinstance(v, dict)}


@reports_failure("evaluate")
def evaluate_models(
    dataset_dir: str | Path,
    checkpoint: str | Path,
    onnx_model: str | Path,
    report_dir: str | Path,
    max_drop: float,
    mlflow_run_id: str = "",
) -> EvalSummary:
    """Evaluate both models on the validation split of ``dataset_dir``; write reports to ``report_dir``.

    ``report_dir`` gets ``detections.json``, ``onnx_detections.json``, ``eval.json`` (the PyTorch
    report) and ``summary.json``; with ``mlflow_run_id`` the statistics (``eval/*``, ``onnx/*``) and
    the folder (artifact path ``evaluation``) go to that run. Raises ExportDegraded after writing
    and logging everything when the export lost more than ``max_drop`` AP.
    """
    from retinaflow.engine.evaluate import write_report
    from retinaflow.engine.infer import infer
    from retinaflow.export.onnx_runtime import infer_onnx

    if max_drop < 0:
        raise ConfigError(f"max_export_drop must be >= 0, got {max_drop}")
    data = load_manifest(dataset_dir)
    images, annotations = local_input(data.val_images), local_input(data.val_annotations)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_result = infer(checkpoint, images, out / "detections.json", None, annotations)
    if torch_result is None:  # infer returns a result whenever annotations are given
        raise RetinaflowError("inference returned no evaluation despite annotations")
    onnx_result = infer_onnx(onnx_model, checkpoint, images, annotations, out / "onnx_detections.json")
    write_report(torch_result, out / "eval.json")
    summary = EvalSummary(
        pytorch=dict(torch_result.stats),
        onnx=dict(onnx_result.stats),
        max_drop=max_drop,
        per_class=dict(torch_result.per_class),
    )
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2))
    log.info("mAP: PyTorch %.4f, ONNX Runtime %.4f (drop %.4f, bound %.4f)", summary.map, summary.onnx_map,
             summary.drop, max_drop)  # fmt: skip
    if mlflow_run_id:
        _log_to_mlflow(mlflow_run_id, summary, out)
    if not summary.passed:
        raise ExportDegraded(
            f"ONNX mAP {summary.onnx_map:.4f} is {summary.drop:.4f} below the PyTorch mAP {summary.map:.4f}, "
            f"more than the allowed {max_drop:.4f}"
        )
    return summary


def load_summary(report_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` an evaluate step wrote."""
    path = Path(report_dir) / SUMMARY_FILE
    if not path.is_file():
        raise ConfigError(f"no evaluation summary at {path}")
    return dict(json.loads(path.read_text()))


def _log_to_mlflow(run_id: str, summary: EvalSummary, folder: Path) -> None:
    import mlflow

    from retinaflow.mlops.settings import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    metrics = {f"eval/{k}": v for k, v in summary.pytorch.items()}
    metrics |= {f"onnx/{k}": v for k, v in summary.onnx.items()}
    metrics["onnx/export_drop"] = summary.drop
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder), artifact_path="evaluation")
