"""`retinaflow eval|export --tracking-uri ...`: the CLI commands themselves are tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from retinaflow.cli import main
from retinaflow.config import Config
from retinaflow.engine.checkpoint import save_checkpoint
from retinaflow.model.retinanet import build_model


def _runs(client: MlflowClient, experiment: str, name: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_eval_command_is_tracked(mlflow_env: Any, synth_small: Any, tmp_path: Path) -> None:
    gt = json.loads(synth_small.val_annotations.read_text())
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    det_file = tmp_path / "dets.json"
    det_file.write_text(json.dumps(dets))
    argv = ["eval", "--annotations", str(synth_small.val_annotations), "--detections", str(det_file)]
    argv += ["--tracking-uri", mlflow_env.uri, "--experiment", "cli-commands", "--run-name", "eval-cli"]
    assert main(argv) == 0
    client = MlflowClient(mlflow_env.uri)
    (run,) = _runs(client, "cli-commands", "eval-cli")
    assert run.data.tags["retinaflow.kind"] == "eval" and run.info.status == "FINISHED"
    assert run.data.metrics["eval/AP"] == pytest.approx(1.0)
    assert "eval/report.json" in _artifacts(client, run.info.run_id)


def test_export_command_logs_the_onnx_file(mlflow_env: Any, tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.backbone, cfg.model.num_classes, cfg.model.fpn_channels, cfg.model.head_convs = (
        "resnet18",
        2,
        16,
        1,
    )
    model = build_model(cfg.model)
    ckpt = tmp_path / "m.pth"
    payload = {"arch": model.arch, "model": model.state_dict(), "config": cfg.to_dict(), "iteration": 0}
    save_checkpoint(ckpt, {**payload, "class_names": ["a", "b"], "category_ids": [1, 2]})
    argv = ["export", str(ckpt), str(tmp_path / "m.onnx"), "--size", "128", "128"]
    argv += ["--tracking-uri", mlflow_env.uri, "--experiment", "cli-commands", "--run-name", "export-cli"]
    with torch.no_grad():
        assert main(argv) == 0
    client = MlflowClient(mlflow_env.uri)
    (run,) = _runs(client, "cli-commands", "export-cli")
    assert run.data.tags["retinaflow.kind"] == "export" and run.data.params["height"] == "128"
    assert "onnx/m.onnx" in _artifacts(client, run.info.run_id)
