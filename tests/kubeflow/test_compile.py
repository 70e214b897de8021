"""The pipeline compiles, carries its Kubernetes settings, and the checked-in YAML matches a fresh compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")

from retinaflow.kubeflow import images
from retinaflow.kubeflow.compile import PIPELINE_FILE, compile_components, compile_pipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("compiled"))
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2, "pipeline spec + platform spec expected"
    return {"path": path, "spec": docs[0], "platform": docs[1]["platforms"]["kubernetes"]["deploymentSpec"]}


def test_checked_in_pipeline_matches_fresh_compile(compiled):
    checked_in = REPO / "pipelines" / PIPELINE_FILE
    assert checked_in.is_file(), "run `retinaflow pipeline compile` and commit pipelines/"
    assert checked_in.read_text() == compiled["path"].read_text(), (
        "pipelines/ is stale: run `retinaflow pipeline compile --components-dir components`"
    )


def test_checked_in_components_match_fresh_compile(tmp_path):
    for fresh in compile_components(tmp_path):
        checked_in = REPO / "components" / fresh.name
        assert checked_in.is_file(), f"components/{fresh.name} missing: recompile"
        assert checked_in.read_text() == fresh.read_text(), f"components/{fresh.name} is stale: recompile"


def test_typed_parameters(compiled):
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    expected = {
        "images": "STRING", "annotations": "STRING", "classes": "LIST", "backbone": "STRING",
        "iters": "NUMBER_INTEGER", "batch": "NUMBER_INTEGER", "precision": "STRING",
        "gpus": "NUMBER_INTEGER", "nodes": "NUMBER_INTEGER", "min_gain": "NUMBER_DOUBLE",
        "max_export_drop": "NUMBER_DOUBLE", "build_trt_engine": "BOOLEAN",
        "first_champion_min_map": "NUMBER_DOUBLE",
    }  # fmt: skip
    for name, kind in expected.items():
        assert params[name]["parameterType"] == kind, name
    assert not params["images"].get("isOptional") and not params["annotations"].get("isOptional")
    assert params["iters"]["defaultValue"] == 90000
    assert params["first_champion_min_map"]["defaultValue"] == 0.0  # the register step's mAP floor


def _branches(spec: dict) -> dict[str, dict]:
    """The two training branches, keyed by the training task they run."""
    out = {}
    for comp in spec["components"].values():
        tasks = comp.get("dag", {}).get("tasks", {})
        for trainer in ("train", "launch-trainjob"):
            if trainer in tasks:
                out[trainer] = tasks
    return out


def _base(task_name: str) -> str:
    return task_name.rstrip("-0123456789") if task_name[-1].isdigit() else task_name


def test_every_step_follows_both_training_branches(compiled):
    branches = _branches(compiled["spec"])
    assert set(branches) == {"train", "launch-trainjob"}
    for tasks in branches.values():
        assert {"export-onnx", "evaluate", "build-engine", "register"} <= {_base(n) for n in tasks}


def test_train_task_kubernetes_settings(compiled):
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["image"] == images.GPU_IMAGE
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "pipelinechannel--gpus" in train["resources"]["accelerator"]["resourceCount"]
    k8s = compiled["platform"]["executors"]["exec-train"]
    assert k8s["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
    ]
    assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    secret_envs = {env["envVar"] for s in k8s["secretAsEnv"] for env in s["keyToEnv"]}
    assert {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "MLFLOW_TRACKING_URI",
    } <= secret_envs
    secret_names = {s["secretNameParameter"]["componentInputParameter"] for s in k8s["secretAsEnv"]}
    assert secret_names == {"pipelinechannel--s3_secret", "pipelinechannel--mlflow_secret"}


def test_train_retries_and_no_caching(compiled):
    branches = _branches(compiled["spec"])
    assert branches["train"]["train"]["retryPolicy"]["maxRetryCount"] == 3
    for tasks in branches.values():
        for name, task in tasks.items():
            assert task["cachingOptions"].get("enableCache", False) is False, name


def test_images_come_from_the_images_module(compiled):
    used = {e["container"]["image"] for e in compiled["spec"]["deploymentSpec"]["executors"].values()}
    assert used <= set(images.ALL_IMAGES.values())
    assert {images.GPU_IMAGE, images.CPU_IMAGE} <= used


def test_components_do_not_pip_install(compiled):
    for name, executor in compiled["spec"]["deploymentSpec"]["executors"].items():
        script = " ".join(executor["container"]["command"])
        assert "pip install" not in script and "pip3 install" not in script, name
