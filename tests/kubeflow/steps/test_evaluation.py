"""evaluate's step: both models' statistics, the report, and the export-drop gate."""

from __future__ import annotations

import json

import pytest

from retinaflow.engine.callbacks import EvalResult
from retinaflow.errors import ConfigError
from retinaflow.kubeflow.steps.data import DatasetManifest
from retinaflow.kubeflow.steps.evaluation import ExportDegraded, evaluate_models, load_summary

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _result(ap: float) -> EvalResult:
    return EvalResult(stats={n: ap for n in NAMES}, per_class={"circle": ap}, num_images=3)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    DatasetManifest("imgs", "train.json", "imgs", "val.json", "f" * 64, 10, 3).save(folder)
    return folder


def _fake(monkeypatch, torch_ap: float, onnx_ap: float) -> list:
    seen = []

    def infer(checkpoint, images, output, cfg, annotations):
        seen.append(("torch", str(images), str(annotations)))
        return _result(torch_ap)

    def infer_onnx(onnx, checkpoint, images, annotations, output):
        seen.append(("onnx", str(images), str(annotations)))
        return _result(onnx_ap)

    monkeypatch.setattr("retinaflow.engine.infer.infer", infer)
    monkeypatch.setattr("retinaflow.export.onnx_runtime.infer_onnx", infer_onnx)
    return seen


def test_small_drop_passes_and_reports_both_models(monkeypatch, dataset, tmp_path):
    seen = _fake(monkeypatch, 0.40, 0.395)
    summary = evaluate_models(dataset, "m.pth", "m.onnx", tmp_path / "report", max_drop=0.01)
    assert summary.passed and summary.drop == pytest.approx(0.005)
    assert set(summary.pytorch) == set(summary.onnx) == set(NAMES)
    assert {s[2] for s in seen} == {str(dataset / "val.json")}  # the validation split, for both
    saved = load_summary(tmp_path / "report")
    assert saved["map"] == 0.40 and saved["onnx_map"] == 0.395 and saved["passed"] is True
    assert json.loads((tmp_path / "report" / "eval.json").read_text())


def test_large_drop_fails_after_writing_the_report(monkeypatch, dataset, tmp_path):
    _fake(monkeypatch, 0.337, 0.291)  # the drop ODTK users met
    with pytest.raises(ExportDegraded, match=r"0\.0460 below"):
        evaluate_models(dataset, "m.pth", "m.onnx", tmp_path / "report", max_drop=0.01)
    assert load_summary(tmp_path / "report")["passed"] is False


def test_negative_bound_is_rejected(dataset, tmp_path):
    with pytest.raises(ConfigError, match="max_export_drop"):
        evaluate_models(dataset, "m.pth", "m.onnx", tmp_path / "report", max_drop=-0.1)
