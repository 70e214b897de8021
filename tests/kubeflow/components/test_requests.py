"""The component bodies build their step's request from every input of the same name (``request_from``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("kfp")

from retinaflow.kubeflow.components import data_prep, launch_trainjob, train
from retinaflow.kubeflow.steps.common import request_from
from retinaflow.kubeflow.steps.data import DataPrepRequest, DatasetManifest
from retinaflow.kubeflow.steps.training import TrainRequest, TrainResult

TRAIN_INPUTS = dict(
    backbone="resnet18", iters=500, batch=8, lr=0.02, precision="bf16", resize=640, max_size=1024,
    gpus=2, val_every=100, checkpoint_every=50, backbone_weights="s3://w/r18.pth",
    overrides=["loss.gamma=1.5"], train_env=["NCCL_DEBUG=INFO"], checkpoint_root="s3://b/ck",
    experiment="exp", run_name="run-1",
)  # fmt: skip
RESULT = TrainResult(Path("/m"), 500, "abc", "s3://b/ck/run-1/model.pth")


def _artifact(path: str) -> SimpleNamespace:
    return SimpleNamespace(path=path, metadata={})


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    ("component", "request_cls"),
    [(train, TrainRequest), (launch_trainjob, TrainRequest), (data_prep, DataPrepRequest)],
)
def test_every_request_field_is_a_component_input(component, request_cls):
    assert _names(request_cls) <= set(component.component_spec.inputs)


def test_request_from_copies_lists_and_names_missing_inputs():
    overrides = ["a.b=1"]
    req = request_from(TrainRequest, {**TRAIN_INPUTS, "overrides": overrides, "dataset": object()})
    assert req == TrainRequest(**{**TRAIN_INPUTS, "overrides": ["a.b=1"]})
    assert req.overrides is not overrides
    with pytest.raises(TypeError, match="run_name"):
        request_from(TrainRequest, {k: v for k, v in TRAIN_INPUTS.items() if k != "run_name"})


def test_train_body(monkeypatch):
    seen = []
    monkeypatch.setattr(
        "retinaflow.kubeflow.steps.training.run_training", lambda *a: seen.append(a) or RESULT
    )
    model = _artifact("/out/model")
    assert train.python_func(dataset=_artifact("/ds"), model=model, **TRAIN_INPUTS) == ("abc", 500)
    assert seen == [(TrainRequest(**TRAIN_INPUTS), "/ds", "/out/model")]
    assert model.metadata == RESULT.metadata()


def test_launch_trainjob_body(monkeypatch):
    from retinaflow.kubeflow.trainjob import TrainJobRequest

    seen = []
    monkeypatch.setattr("retinaflow.kubeflow.trainjob.run_trainjob", lambda *a: seen.append(a) or RESULT)
    cluster = dict(nodes=3, namespace="ns", s3_secret="s3s", mlflow_secret="mls")
    out = launch_trainjob.python_func(
        dataset=_artifact("/ds"), model=_artifact("/out/model"), **TRAIN_INPUTS, **cluster
    )
    assert out == ("abc", 500)
    assert seen == [(TrainJobRequest(train=TrainRequest(**TRAIN_INPUTS), **cluster), "/ds", "/out/model")]


def test_data_prep_body(monkeypatch):
    inputs = dict(
        images="s3://d/img", annotations="s3://d/a.json", val_images="", val_annotations="",
        val_fraction=0.2, seed=7, classes=["cat", "dog"], stage_uri="s3://stage",
    )  # fmt: skip
    manifest = DatasetManifest("i", "t.json", "i", "v.json", "f" * 64, 8, 2, ["cat", "dog"])
    seen = []
    monkeypatch.setattr(
        "retinaflow.kubeflow.steps.data.prepare_dataset", lambda *a: seen.append(a) or manifest
    )
    dataset = _artifact("/ds")
    assert data_prep.python_func(dataset=dataset, **inputs) == ("f" * 64, 8, 2)
    assert seen == [(DataPrepRequest(**inputs), "/ds")]
    assert dataset.metadata == manifest.metadata()


def test_train_request_settings_are_config_keys_with_the_config_defaults():
    from retinaflow.config import Config
    from retinaflow.kubeflow.params import pipeline_inputs
    from retinaflow.kubeflow.steps.training import CONFIG_FLAGS

    assert {f.name for f in CONFIG_FLAGS} >= {"iters", "checkpoint_every", "backbone", "lr"}
    defaults, inputs = Config(), pipeline_inputs()
    for flag, value in TrainRequest().settings():
        section, name = flag.key.split(".")
        assert value == getattr(getattr(defaults, section), name), flag.key
        assert inputs[flag.name].default == value, flag.name  # the pipeline's default too
