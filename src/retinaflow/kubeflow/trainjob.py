"""Training past one node: a Kubeflow Trainer ``TrainJob`` running the train step's command.

The TrainJob uses the ``torch-distributed`` ClusterTrainingRuntime of Kubeflow Trainer v2
(``trainer.kubeflow.org/v1alpha1``); the runtime sets the ``PET_*`` variables that ``torchrun``
reads (nodes, processes per node, rank, rendezvous), so every node runs the same
``torchrun -m retinaflow train`` as the single-pod step. Data and checkpoint must be on ``s3://``:
the worker pods share nothing else with the launching step. ``manifests/trainer/trainjob.yaml``
is this module's output for example values (a test keeps the two equal).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinaflow.errors import ConfigError
from retinaflow.kubeflow.cluster import GPU_NODE_LABEL, GPU_RESOURCE, MLFLOW_KEYS, S3_KEYS, SHM_SIZE
from retinaflow.kubeflow.images import GPU_IMAGE
from retinaflow.kubeflow.steps.common import find_run_id, is_remote, local_input, tracking_enabled
from retinaflow.kubeflow.steps.data import DatasetManifest, load_manifest
from retinaflow.kubeflow.steps.training import (
    TrainingFailed,
    TrainRequest,
    TrainResult,
    checkpoint_uri,
    train_args,
)

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"


@dataclass
class TrainJobRequest:
    train: TrainRequest
    nodes: int = 2
    namespace: str = "kubeflow"
    s3_secret: str = "retinaflow-s3"
    mlflow_secret: str = "retinaflow-mlflow"
    image: str = GPU_IMAGE
    runtime: str = RUNTIME
    shm_size: str = SHM_SIZE
    poll_seconds: float = 30.0
    labels: dict[str, str] = field(default_factory=lambda: {"app.kubernetes.io/part-of": "retinaflow"})


def job_name(run_name: str) -> str:
    """A DNS-1123 name (<= 63 chars) derived from the KFP run name, stable across launcher retries."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    name = slug if slug.startswith("retinaflow-") else f"retinaflow-{slug}"
    return name[:63].rstrip("-")


def trainjob_manifest(req: TrainJobRequest, data: DatasetManifest) -> dict[str, Any]:
    """The TrainJob object for ``req`` on the prepared dataset ``data``."""
    gpus = req.train.gpus
    uri = checkpoint_uri(req.train, default_root=Path("unused"))
    env = [_secret_env(k, req.s3_secret) for k in S3_KEYS] + [
        _secret_env(k, req.mlflow_secret) for k in MLFLOW_KEYS
    ]
    env += [{"name": k, "value": v} for k, v in req.train.environment().items()]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": job_name(req.train.run_name),
            "namespace": req.namespace,
            "labels": dict(req.labels),
        },
        "spec": {
            "runtimeRef": {"name": req.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": req.image,
                "command": ["torchrun"],
                "args": train_args(req.train, data, uri, tracked=True),
                "numNodes": req.nodes,
                "numProcPerNode": gpus,
                "resourcesPerNode": {"limits": {GPU_RESOURCE: str(gpus)}},
                "env": env,
            },
            "podTemplateOverrides": [
                {
                    "targetJobs": [{"name": "node"}],
                    "spec": {
                        "nodeSelector": {GPU_NODE_LABEL[0]: GPU_NODE_LABEL[1]},
                        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
                        "volumes": [
                            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": req.shm_size}}
                        ],
                        "containers": [
                            {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
                        ],
                    },
                }
            ],
        },
    }


def run_trainjob(
    req: TrainJobRequest, dataset_dir: str | Path, model_path: str | Path, api: Any = None
) -> TrainResult:
    """Create the TrainJob (or find the one a previous attempt created), wait, fetch the checkpoint.

    ``api``: a kubernetes ``CustomObjectsApi``; by default built from the in-cluster service account
    (the KFP pipeline runner needs the Role of ``manifests/trainer/rbac.yaml``).
    """
    if req.nodes < 2:
        raise ConfigError(f"a TrainJob is for 2 or more nodes, got nodes={req.nodes}")
    if req.train.gpus < 1:
        raise ConfigError("a TrainJob needs gpus >= 1 per node")
    req.train.check()
    world = req.nodes * req.train.gpus  # checked here, not by each worker once the nodes are up
    if req.train.batch % world:
        raise ConfigError(f"batch {req.train.batch} must be a multiple of nodes x gpus = {world}")
    data = load_manifest(dataset_dir)
    uri = checkpoint_uri(req.train, default_root=Path("unused"))
    paths = (data.train_images, data.train_annotations, data.val_images, data.val_annotations, uri)
    local_only = [p for p in paths if not is_remote(p)]
    if local_only:
        raise ConfigError(
            f"multi-node training needs the dataset and checkpoint_root on s3:// (set stage_uri and "
            f"checkpoint_root); {local_only[0]} is local to this pod"
        )
    api = api or _custom_objects_api()
    body = trainjob_manifest(req, data)
    name = body["metadata"]["name"]
    _create_or_adopt(api, req.namespace, body)
    _wait(api, req.namespace, name, req.poll_seconds)
    out = Path(model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(local_input(uri).read_bytes())
    from retinaflow.engine.checkpoint import load_checkpoint

    iteration = int(load_checkpoint(out)["iteration"])
    run_id = find_run_id(req.train.experiment, req.train.run_name) if tracking_enabled() else ""
    return TrainResult(checkpoint=out, iterations=iteration, mlflow_run_id=run_id, checkpoint_uri=uri)


def _secret_env(key: str, secret: str) -> dict[str, Any]:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _custom_objects_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def _create_or_adopt(api: Any, namespace: str, body: dict[str, Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        log.info("created TrainJob %s/%s", namespace, name)
    except ApiException as exc:
        if exc.status != 409:
            raise
        log.info("TrainJob %s/%s exists (launcher retried): following it", namespace, name)


def _wait(api: Any, namespace: str, name: str, poll_seconds: float) -> None:
    """Poll the TrainJob's conditions until Complete (return) or Failed (raise)."""
    while True:
        obj = api.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name)
        conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions", [])}
        failed = conditions.get("Failed", {})
        if failed.get("status") == "True":
            raise TrainingFailed(
                f"TrainJob {namespace}/{name} failed: {failed.get('message') or failed.get('reason')}"
            )
        if conditions.get("Complete", {}).get("status") == "True":
            log.info("TrainJob %s/%s complete", namespace, name)
            return
        time.sleep(poll_seconds)
