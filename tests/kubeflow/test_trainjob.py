"""launch_trainjob: the TrainJob it creates, how it follows it, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from retinaflow.errors import ConfigError
from retinaflow.kubeflow.steps.data import DatasetManifest
from retinaflow.kubeflow.steps.training import TrainingFailed, TrainRequest
from retinaflow.kubeflow.trainjob import GROUP, PLURAL, VERSION, TrainJobRequest, job_name, run_trainjob

S3 = DatasetManifest("s3://d/img", "s3://d/train.json", "s3://d/img", "s3://d/val.json", "f" * 64, 8, 2)


class FakeApi:
    def __init__(self, states: list[dict], exists: bool = False) -> None:
        self.states, self.exists = states, exists
        self.created: list[dict] = []
        self.polled = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == (GROUP, VERSION, PLURAL)
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)

    def get_namespaced_custom_object_status(self, group, version, namespace, plural, name):
        self.polled += 1
        return {"status": {"conditions": self.states.pop(0) if len(self.states) > 1 else self.states[0]}}


def _setup(tmp_path, monkeypatch, data=S3) -> tuple[Path, TrainJobRequest]:
    monkeypatch.setenv("RETINAFLOW_NO_MLFLOW", "1")
    folder = tmp_path / "ds"
    folder.mkdir()
    data.save(folder)
    ckpt = tmp_path / "fetched.pth"
    ckpt.write_bytes(b"weights")
    monkeypatch.setattr("retinaflow.kubeflow.trainjob.local_input", lambda uri: ckpt)
    monkeypatch.setattr("retinaflow.engine.checkpoint.load_checkpoint", lambda path: {"iteration": 90})
    train = TrainRequest(
        gpus=8, batch=64, checkpoint_root="s3://b/ck", run_name="Run_1", train_env=["NCCL_SOCKET_IFNAME=eth0"]
    )
    return folder, TrainJobRequest(train=train, nodes=4, poll_seconds=0)


def test_creates_the_job_and_fetches_the_checkpoint(tmp_path, monkeypatch):
    folder, req = _setup(tmp_path, monkeypatch)
    api = FakeApi([[], [{"type": "Created", "status": "True"}], [{"type": "Complete", "status": "True"}]])
    result = run_trainjob(req, folder, tmp_path / "out" / "model", api=api)
    job = api.created[0]
    assert job["metadata"]["name"] == "retinaflow-run-1" == job_name("Run_1")
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["command"]) == (4, 8, ["torchrun"])
    assert trainer["args"][:4] == ["-m", "retinaflow", "train", "s3://b/ck/Run_1/model.pth"]
    secrets = [e for e in trainer["env"] if "valueFrom" in e]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in secrets} == {"retinaflow-s3", "retinaflow-mlflow"}
    # train_env reaches every node's container (NCCL's network settings of the cluster)
    assert [e for e in trainer["env"] if "value" in e] == [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}]
    assert api.polled == 3 and result.iterations == 90
    assert (tmp_path / "out" / "model").read_bytes() == b"weights"


def test_a_retried_launcher_follows_the_existing_job(tmp_path, monkeypatch):
    folder, req = _setup(tmp_path, monkeypatch)
    api = FakeApi([[{"type": "Complete", "status": "True"}]], exists=True)
    run_trainjob(req, folder, tmp_path / "model", api=api)
    assert api.created == [] and api.polled == 1


def test_failed_job_fails_the_step(tmp_path, monkeypatch):
    folder, req = _setup(tmp_path, monkeypatch)
    api = FakeApi([[{"type": "Failed", "status": "True", "message": "node-1 OOMKilled"}]])
    with pytest.raises(TrainingFailed, match="OOMKilled"):
        run_trainjob(req, folder, tmp_path / "model", api=api)


def test_local_data_is_refused(tmp_path, monkeypatch):
    local = DatasetManifest("/d/img", "train.json", "/d/img", "val.json", "f" * 64, 8, 2)
    folder, req = _setup(tmp_path, monkeypatch, data=local)
    with pytest.raises(ConfigError, match="needs the dataset and checkpoint_root on s3://"):
        run_trainjob(req, folder, tmp_path / "model", api=FakeApi([[]]))
    req.nodes = 1
    with pytest.raises(ConfigError, match="2 or more nodes"):
        run_trainjob(req, folder, tmp_path / "model", api=FakeApi([[]]))


def test_a_batch_that_does_not_split_over_all_nodes_is_refused_before_the_job(tmp_path, monkeypatch):
    folder, req = _setup(tmp_path, monkeypatch)  # 4 nodes x 8 GPUs
    req.train.batch = 48  # a multiple of the 8 GPUs of one node, not of the 32 ranks
    api = FakeApi([[{"type": "Complete", "status": "True"}]])
    with pytest.raises(ConfigError, match="batch 48 must be a multiple of nodes x gpus = 32"):
        run_trainjob(req, folder, tmp_path / "model", api=api)
    assert api.created == []
