"""The whole pipeline on this machine (kfp.local, CPU, synthetic data, embedded MLflow): every step
runs, a model version is registered with metrics and artifacts, and the CLI prints the summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from retinaflow.kubeflow.local import LocalRunOptions, print_summary, run_local

pytestmark = pytest.mark.slow

TINY = {
    "resize": 128,
    "max_size": 128,
    "batch": 2,
    "overrides": ["model.fpn_channels=32", "model.head_convs=1", "data.jitter=[128, 128]", "data.workers=0"],
}
STATS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}


def test_local_pipeline_registers_a_tracked_model(tmp_path, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RETINAFLOW_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # run_local prepends this interpreter's folder
    opts = LocalRunOptions(output=tmp_path / "run", images=12, iters=4, arguments=dict(TINY))
    result = run_local(opts)

    # evaluation: the 12 COCO stats of both models, and the export gate's verdict
    assert set(result.summary["pytorch"]) == STATS and set(result.summary["onnx"]) == STATS
    assert result.summary["passed"] is True
    assert abs(result.summary["export_drop"]) <= result.summary["max_export_drop"]
    assert result.summary["onnx_latency_ms"] > 0  # the end-to-end ONNX, batch 1

    # registry: the first version is challenger; 4 iterations learn nothing (mAP 0), and a first champion
    # must be above the pipeline's first_champion_min_map floor (default 0), so none is made
    assert result.summary["map"] == 0.0
    assert [v["version"] for v in result.versions] == ["1"]
    assert set(result.versions[0]["aliases"]) == {"challenger"}
    assert result.versions[0]["decision"] == "refused"

    # the version's run holds the training metrics, the evaluation metrics and the files
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version(opts.model_name, "1")
    run = client.get_run(version.run_id)
    assert run.data.metrics["eval/AP"] == pytest.approx(result.summary["map"])
    assert "onnx/AP" in run.data.metrics
    model_files = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {"model/model.pth", "model/model.onnx"} <= model_files
    assert version.tags["dataset_fingerprint"] and version.tags["engine"] == "not built"
    evaluation = mlflow.artifacts.download_artifacts(
        run_id=version.run_id,
        artifact_path="evaluation/summary.json",
        tracking_uri=uri,
        dst_path=str(tmp_path / "dl"),
    )
    assert json.loads(Path(evaluation).read_text())["map"] == pytest.approx(result.summary["map"])

    # the skipped TensorRT build says why
    builds = list(result.artifacts.glob("*/build-engine*/engine/build.json"))
    assert builds and json.loads(builds[0].read_text())["built"] is False
    assert json.loads(builds[0].read_text())["reason"]
    # and so does the .pt2 build on this GPU-less machine
    (pt2,) = json.loads((builds[0].parent / "engines.json").read_text())
    assert pt2["name"] == "pt2" and pt2["built"] is False and "no CUDA device" in pt2["reason"]

    print_summary(result)
    shown = capsys.readouterr().out
    assert "mAP (val" in shown and "challenger" in shown and "mlflow ui --backend-store-uri" in shown
