"""build_engine's .pt2 (skipped with the reason without a GPU) and evaluate's engine gate."""

from __future__ import annotations

import pytest

from retinaflow.engine.callbacks import EvalResult
from retinaflow.kubeflow.steps.data import DatasetManifest
from retinaflow.kubeflow.steps.engines import EngineRecord, build_pt2_engine, read_records, write_records
from retinaflow.kubeflow.steps.evaluation import ExportDegraded, evaluate_models, load_summary

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _result(ap: float) -> EvalResult:
    return EvalResult(stats={n: ap for n in NAMES}, per_class={"circle": ap}, num_images=3)


def test_pt2_build_is_skipped_with_the_reason_on_a_cpu_node(monkeypatch, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    record = build_pt2_engine("m.pth", tmp_path, "fp16", 256)
    assert not record.built and "no CUDA device" in record.reason
    write_records(tmp_path, [record])
    assert read_records(tmp_path) == [record]


@pytest.fixture
def engines(tmp_path, monkeypatch):
    data = tmp_path / "ds"
    data.mkdir()
    DatasetManifest("imgs", "train.json", "imgs", "val.json", "f" * 64, 10, 3).save(data)
    built = tmp_path / "engine"
    built.mkdir()
    tags = {"precision": "fp16", "batch_range": "1-8", "gpu": "H100"}
    write_records(built, [EngineRecord("pt2", True, "built", "model.pt2", tags)])
    monkeypatch.setattr("retinaflow.engine.infer.infer", lambda *a: _result(0.40))
    monkeypatch.setattr("retinaflow.export.onnx_runtime.infer_onnx", lambda *a: _result(0.40))
    return data, built


def test_every_built_engine_is_evaluated_and_gated(engines, tmp_path, monkeypatch):
    data, built = engines
    seen = []

    def evaluate_engine(path, images, annotations, output):
        seen.append(path.name)
        return {**_result(0.398).stats, "latency_ms": 2.0}

    monkeypatch.setattr("retinaflow.kubeflow.steps.engines.evaluate_engine", evaluate_engine)
    summary = evaluate_models(data, "m.pth", "m.onnx", tmp_path / "r", max_drop=0.005, engine_dir=built)
    assert seen == ["model.pt2"] and summary.passed
    pt2 = load_summary(tmp_path / "r")["engines"]["pt2"]
    assert pt2["latency_ms"] == 2.0 and pt2["drop"] == pytest.approx(0.002) and pt2["tags"]["gpu"] == "H100"
    assert load_summary(tmp_path / "r")["onnx_latency_ms"] is None  # m.onnx is no end-to-end graph here


def test_an_engine_losing_more_than_the_margin_fails_the_step(engines, tmp_path, monkeypatch):
    data, built = engines
    monkeypatch.setattr(
        "retinaflow.kubeflow.steps.engines.evaluate_engine",
        lambda *a: {**_result(0.39).stats, "latency_ms": 2.0},
    )
    with pytest.raises(ExportDegraded, match=r"pt2 engine mAP 0\.3900 is 0\.0100 below"):
        evaluate_models(data, "m.pth", "m.onnx", tmp_path / "r", max_drop=0.005, engine_dir=built)
    assert load_summary(tmp_path / "r")["passed"] is False
