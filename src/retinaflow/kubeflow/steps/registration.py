"""The register step: a model version in the MLflow registry (alias challenger), then the promotion gate.

Both halves are :mod:`retinaflow.mlops.registry` (``register``, ``promote``); this step only gives the
KFP artifacts their file names (``model.pth``, ``model.onnx``, ``model.plan`` with its metadata
``model.plan.json``) and adds the pipeline's evidence (dataset fingerprint, ONNX mAP) to the version's tags.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaflow.kubeflow.steps.common import reports_failure
from retinaflow.kubeflow.steps.data import load_manifest
from retinaflow.kubeflow.steps.evaluation import load_summary
from retinaflow.kubeflow.steps.packaging import engine_file


@dataclass
class RegisterRequest:
    dataset_dir: str
    checkpoint: str
    onnx_dir: str
    engine_dir: str
    report_dir: str
    model_name: str
    mlflow_run_id: str = ""
    min_gain: float = 0.005
    max_latency_regression: float = 0.1
    first_champion_min_map: float = 0.0


@dataclass
class RegisterOutcome:
    version: str
    promoted: bool
    decision: str


@reports_failure("register")
def register_and_promote(req: RegisterRequest) -> RegisterOutcome:
    """Register checkpoint + ONNX (+ engine when built) under ``model_name``; apply the gate."""
    from retinaflow.mlops.registry import ModelFiles, promote, register_model

    data = load_manifest(req.dataset_dir)
    summary = load_summary(req.report_dir)
    engine = engine_file(req.engine_dir)
    tags = {
        "dataset_fingerprint": data.fingerprint,
        "onnx_map": summary["onnx_map"],
        "export_drop": summary["export_drop"],
        "engine": "built" if engine else "not built",
    }
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp)
        files = ModelFiles(  # the engine is already model.plan, its metadata model.plan.json beside it
            checkpoint=_named_copy(req.checkpoint, named / "model.pth"),
            onnx=_named_copy(req.onnx_dir, named / "model.onnx"),
            engine=engine,
        )
        version = register_model(
            req.model_name, run_id=req.mlflow_run_id or None, files=files, map_value=summary["map"], tags=tags
        )
    decision = promote(
        req.model_name,
        min_gain=req.min_gain,
        max_latency_regression=req.max_latency_regression,
        first_champion_min_map=req.first_champion_min_map,
    )
    return RegisterOutcome(
        version=str(version.version), promoted=decision.promoted, decision=decision.summary()
    )


def registry_state(model_name: str) -> list[dict[str, Any]]:
    """Versions of ``model_name`` (newest first): version, aliases, mAP, promotion decision."""
    from retinaflow.mlops.registry import list_versions

    return [
        {"name": model_name, "version": r.version, "aliases": r.aliases, "map": r.map, "decision": r.decision}
        for r in list_versions(model_name)
    ]


def _named_copy(source: str, target: Path) -> Path:
    """Link (or copy) a KFP artifact file under the name the registry shows."""
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, target)
    return target
