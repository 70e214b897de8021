"""Every Kubernetes object of manifests/ (files and rendered overlays) validates against the schemas."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from tests.manifests.kustomize_render import load_docs, render
from tests.manifests.trainjob_example import render as render_trainjob

from retinaflow.kubeflow import images, pipeline

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
K8S = kubernetes_validate.latest_version()
CUSTOM_KINDS = {"TrainJob", "PyTorchJob"}
OBJECT_FILES = sorted(
    p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml" and "gpu" not in p.parts
)


def validate(obj: dict) -> None:
    if obj["kind"] == "TrainJob":
        _validate_trainjob(obj)
    elif obj["kind"] == "PyTorchJob":
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            assert replica["replicas"] >= 1, role
            _validate_pod(replica["template"]["spec"], f"{obj['metadata']['name']}-{role.lower()}")
    else:
        kubernetes_validate.validate(obj, K8S, strict=True)


def _validate_pod(spec: dict, name: str) -> None:
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}, K8S, strict=True
    )


def _validate_trainjob(obj: dict) -> None:
    """TrainJob (trainer.kubeflow.org/v1alpha1): no schema ships offline, so check its fields and
    validate the pod it describes (trainer container + the node overrides) as a core/v1 Pod."""
    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    spec = obj["spec"]
    assert spec["runtimeRef"]["kind"] == "ClusterTrainingRuntime" and spec["runtimeRef"]["name"]
    trainer = spec["trainer"]
    assert trainer["numNodes"] >= 2 and trainer["numProcPerNode"] >= 1
    override = next(o for o in spec["podTemplateOverrides"] if {"name": "node"} in o["targetJobs"])["spec"]
    container = {
        "name": "node",
        "image": trainer["image"],
        "command": trainer["command"],
        "args": trainer["args"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
        "volumeMounts": override["containers"][0]["volumeMounts"],
    }
    pod = {k: v for k, v in override.items() if k != "containers"} | {"containers": [container]}
    _validate_pod(pod, obj["metadata"]["name"])


@pytest.mark.parametrize("path", OBJECT_FILES, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_object_file_validates(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no object"
    for obj in docs:
        validate(obj)


@pytest.mark.parametrize("overlay", ["overlays/offline", "trainer/pytorchjob"])
def test_rendered_overlay_validates(overlay):
    remote: list[str] = []
    objects = render(MANIFESTS / overlay, remote)
    assert objects and not remote
    for obj in objects:
        validate(obj)
    if overlay == "overlays/offline":
        assert {o["metadata"]["namespace"] for o in objects} == {"kubeflow"}
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
        assert {
            ("Deployment", "mlflow"),
            ("Service", "mlflow"),
            ("ConfigMap", "kfp-launcher"),
            ("Role", "retinaflow-trainjob-launcher"),
        } <= kinds
    else:
        for replica in objects[0]["spec"]["pytorchReplicaSpecs"].values():
            pod = replica["template"]["spec"]
            assert pod["nodeSelector"] == {pipeline.GPU_NODE_LABEL[0]: pipeline.GPU_NODE_LABEL[1]}
            assert pod["tolerations"][0]["key"] == pipeline.GPU_RESOURCE


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("overlay", ["overlays/offline", "trainer/pytorchjob"])
def test_small_renderer_agrees_with_kustomize(overlay):
    cmd = ["kubectl", "kustomize", str(MANIFESTS / overlay)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    theirs = sorted((o for o in yaml.safe_load_all(out) if o), key=_identity)
    ours = sorted(render(MANIFESTS / overlay), key=_identity)
    assert [_identity(o) for o in ours] == [_identity(o) for o in theirs]
    assert ours == theirs


def _identity(obj: dict) -> tuple:
    return obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace", "")


def test_standalone_pins_upstream_kfp():
    remote: list[str] = []
    render(MANIFESTS / "overlays/standalone", remote)
    assert remote, "the standalone overlay must pull the upstream KFP manifests"
    for url in remote:
        assert re.search(r"github\.com/kubeflow/pipelines/manifests/.+\?ref=\d+\.\d+\.\d+$", url), url


def test_pipeline_root_on_s3():
    launcher = load_docs(MANIFESTS / "kfp/launcher/kfp-launcher.yaml")[0]
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    providers = yaml.safe_load(launcher["data"]["providers"])
    assert providers["s3"]["default"]["credentials"]["secretRef"]["secretName"] == "retinaflow-s3"


def test_mlflow_server_settings():
    deployment = load_docs(MANIFESTS / "mlflow/deployment.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)
    assert "mlflow.kubeflow.svc.cluster.local:5000" in args["allowed-hosts"].split(",")
    assert args["artifacts-destination"].startswith("s3://")
    assert args["backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    db = load_docs(MANIFESTS / "secrets/mlflow-db.yaml")[0]["stringData"]["MLFLOW_BACKEND_STORE_URI"]
    assert db.startswith("postgresql://")
    assert container["image"] == images.MLFLOW_IMAGE
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_secret_templates_carry_the_keys_the_pipeline_reads_and_no_secret():
    s3 = load_docs(MANIFESTS / "secrets/s3-credentials.yaml")[0]
    tracking = load_docs(MANIFESTS / "secrets/mlflow-tracking.yaml")[0]
    assert set(pipeline.S3_KEYS) <= set(s3["stringData"])
    assert set(pipeline.MLFLOW_KEYS) <= set(tracking["stringData"])
    assert s3["stringData"]["AWS_ACCESS_KEY_ID"] == s3["stringData"]["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME"


def test_trainjob_example_is_what_the_launcher_renders():
    assert (MANIFESTS / "trainer/trainjob-example.yaml").read_text() == render_trainjob(), (
        "regenerate: python tests/manifests/trainjob_example.py > manifests/trainer/trainjob-example.yaml"
    )


def test_gpu_images_match_the_images_module():
    job = load_docs(MANIFESTS / "trainer/pytorchjob/pytorchjob.yaml")[0]
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["containers"][0]["image"] == images.GPU_IMAGE
