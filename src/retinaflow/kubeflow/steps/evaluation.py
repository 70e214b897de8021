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
    # per built engine (build_engine's .pt2): its COCO statistics, "latency_ms" and "drop" (AP below PyTorch)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    onnx_latency_ms: float | None = None  # batch 1, ONNX Runtime CPU; None for a network-only graph

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
        return self.drop <= self.max_drop and all(e["drop"] <= self.max_drop for e in self.engines.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "pytorch": self.pytorch,
            "onnx": self.onnx,
            "per_class": self.per_class,
            "map": self.map,
            "onnx_map": self.onnx_map,
            "export_drop": self.drop,
            "max_export_drop": self.max_drop,
            "engines": self.engines,
            "onnx_latency_ms": self.onnx_latency_ms,
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
    engine_dir: str | Path = "",
) -> EvalSummary:
    """Evaluate both models on the validation split of ``dataset_dir``; write reports to ``report_dir``.

    ``report_dir`` gets ``detections.json``, ``onnx_detections.json``, ``eval.json`` (the PyTorch
    report) and ``summary.json``; with ``mlflow_run_id`` the statistics (``eval/*``, ``onnx/*``) and
    the folder (artifact path ``evaluation``) go to that run. Each engine built into ``engine_dir`` (see
    :mod:`.engines`) is evaluated too (``<name>_detections.json``, mAP and batch-1 latency, MLflow tags).
    Raises ExportDegraded after writing and logging everything when the ONNX export or an engine lost
    more than ``max_drop`` AP.
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
    summary.engines = _evaluate_engines(engine_dir, images, annotations, out, summary.map)
    summary.onnx_latency_ms = _onnx_latency(onnx_model)
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2))
    log.info("mAP: PyTorch %.4f, ONNX Runtime %.4f (drop %.4f, bound %.4f)", summary.map, summary.onnx_map,
             summary.drop, max_drop)  # fmt: skip
    if mlflow_run_id:
        _log_to_mlflow(mlflow_run_id, summary, out, engine_dir)
    if not summary.passed:
        raise ExportDegraded(_degraded(summary))
    return summary


def _degraded(summary: EvalSummary) -> str:
    """The ExportDegraded message naming the worst artifact."""
    drops = {"ONNX": (summary.onnx_map, summary.drop)}
    drops |= {f"{n} engine": (e["AP"], e["drop"]) for n, e in summary.engines.items()}
    name, (ap, drop) = max(drops.items(), key=lambda kv: kv[1][1])
    return (
        f"{name} mAP {ap:.4f} is {drop:.4f} below the PyTorch mAP {summary.map:.4f}, "
        f"more than the allowed {summary.max_drop:.4f}"
    )


def _onnx_latency(onnx_model: str | Path) -> float | None:
    """Batch-1 latency of an end-to-end ONNX graph; None for one that is not (network only)."""
    from retinaflow.export.engines import EngineError
    from retinaflow.kubeflow.steps.engines import batch1_latency_ms

    try:
        return batch1_latency_ms(onnx_model)
    except EngineError:
        return None


def _evaluate_engines(
    engine_dir: str | Path, images: str | Path, annotations: str | Path, out: Path, reference_map: float
) -> dict[str, dict[str, Any]]:
    """Statistics, batch-1 latency and AP drop of every engine built into ``engine_dir``."""
    from retinaflow.kubeflow.steps.engines import evaluate_engine, read_records

    found: dict[str, dict[str, Any]] = {}
    for record in read_records(engine_dir) if engine_dir else []:
        if not record.built:
            log.info("engine %s not evaluated: %s", record.name, record.reason)
            continue
        stats = evaluate_engine(
            Path(engine_dir) / record.file, images, annotations, out / f"{record.name}.json"
        )
        found[record.name] = {**stats, "drop": reference_map - stats["AP"], "tags": record.tags}
        log.info("%s engine: mAP %.4f, batch-1 %.2f ms", record.name, stats["AP"], stats["latency_ms"])
    return found


def load_summary(report_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` an evaluate step wrote."""
    path = Path(report_dir) / SUMMARY_FILE
    if not path.is_file():
        raise ConfigError(f"no evaluation summary at {path}")
    return dict(json.loads(path.read_text()))


def _log_to_mlflow(run_id: str, summary: EvalSummary, folder: Path, engine_dir: str | Path = "") -> None:
    import mlflow

    from retinaflow.mlops.settings import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    metrics = {f"eval/{k}": v for k, v in summary.pytorch.items()}
    metrics |= {f"onnx/{k}": v for k, v in summary.onnx.items()}
    metrics["onnx/export_drop"] = summary.drop
    if summary.onnx_latency_ms is not None:
        metrics["onnx/latency_ms"] = summary.onnx_latency_ms
    tags: dict[str, str] = {}
    for name, e in summary.engines.items():
        metrics |= {f"engine/{name}/{k}": v for k, v in e.items() if isinstance(v, (int, float))}
        tags |= {f"engine.{name}.{k}": str(v) for k, v in e["tags"].items()}
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags)
        mlflow.log_artifacts(str(folder), artifact_path="evaluation")
        if summary.engines:
            mlflow.log_artifacts(str(engine_dir), artifact_path="engines")
