"""train's step: the command it launches, the durable checkpoint and its sync, failures."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from retinaflow.errors import ConfigError
from retinaflow.kubeflow.steps import training
from retinaflow.kubeflow.steps.data import DatasetManifest
from retinaflow.kubeflow.steps.training import (
    TrainingFailed,
    TrainRequest,
    checkpoint_uri,
    run_training,
    train_argv,
)

DATA = DatasetManifest("/d/img", "/d/train.json", "/d/img", "/d/val.json", "f" * 64, 8, 2)


def test_cpu_runs_one_process_gpus_run_torchrun():
    req = TrainRequest(gpus=0, batch=4, iters=10, overrides=["loss.gamma=1.5"], run_name="r")
    argv = train_argv(req, DATA, "/ck/model.pth", tracked=True)
    assert argv[:5] == [sys.executable, "-m", "retinaflow", "train", "/ck/model.pth"]
    flags = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert (
        flags["--images"] == "/d/img"
        and flags["--val-annotations"] == "/d/val.json"
        and flags["--iters"] == "10"
    )
    assert argv[argv.index("--mlflow") + 1 :] == ["--experiment", "retinaflow", "--run-name", "r"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets[-1] == "loss.gamma=1.5" and "infer.resize=800" in sets  # evaluation at the training size
    gpu = train_argv(TrainRequest(gpus=4, batch=16), DATA, "/ck/model.pth", tracked=False)
    assert gpu[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert "--mlflow" not in gpu


def test_checkpoint_location_is_stable_per_run():
    req = TrainRequest(checkpoint_root="s3://b/ck/", run_name="retinaflow-train-2026/11 25")
    assert checkpoint_uri(req, Path("/tmp/x")) == "s3://b/ck/retinaflow-train-2026-11-25/model.pth"
    assert checkpoint_uri(TrainRequest(run_name="a"), Path("/tmp/x")) == "/tmp/x/a/model.pth"


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (TrainRequest(gpus=3, batch=16), "multiple of gpus"),
        (TrainRequest(iters=0), "train.iters must be positive"),
        (TrainRequest(overrides=["nonsense"]), "section.key=value"),
    ],
)
def test_bad_requests(req, message):
    with pytest.raises(ConfigError, match=message):
        req.check()


def _dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    folder.mkdir()
    DATA.save(folder)
    return folder


def test_failed_training_keeps_the_checkpoint_location(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINAFLOW_NO_MLFLOW", "1")
    monkeypatch.setattr(training.subprocess, "call", lambda argv, env: 3)
    req = TrainRequest(gpus=0, batch=2, checkpoint_root=str(tmp_path / "ck"), run_name="run")
    with pytest.raises(TrainingFailed, match="code 3"):
        run_training(req, _dataset(tmp_path), tmp_path / "out" / "model")


def test_resume_from_s3_then_copy_to_the_model_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINAFLOW_NO_MLFLOW", "1")
    downloaded: list[str] = []

    def download_if_exists(uri, dest):
        downloaded.append(uri)
        Path(dest).write_bytes(b"previous attempt")
        return True

    def trainer(argv, env):
        assert env["NCCL_DEBUG"] == "INFO" and env["PATH"] == os.environ["PATH"]  # added, not replaced
        checkpoint = Path(argv[4])
        assert checkpoint.read_bytes() == b"previous attempt"  # the trainer resumes from it
        checkpoint.write_bytes(b"final")
        return 0

    uploads: list[tuple[str, bytes]] = []
    monkeypatch.setattr("retinaflow.mlops.storage.download_if_exists", download_if_exists)
    monkeypatch.setattr(
        training, "upload", lambda local, uri: uploads.append((uri, Path(local).read_bytes()))
    )
    monkeypatch.setattr(training.subprocess, "call", trainer)
    monkeypatch.setattr("retinaflow.engine.checkpoint.load_checkpoint", lambda path: {"iteration": 42})
    req = TrainRequest(
        gpus=0, batch=2, checkpoint_root="s3://b/ck", run_name="run", train_env=["NCCL_DEBUG=INFO"]
    )
    result = run_training(req, _dataset(tmp_path), tmp_path / "out" / "model")
    assert downloaded == ["s3://b/ck/run/model.pth"] == [result.checkpoint_uri]
    assert uploads == [("s3://b/ck/run/model.pth", b"final")]
    assert (tmp_path / "out" / "model").read_bytes() == b"final" and result.iterations == 42


@pytest.mark.parametrize("item", ["NCCL_DEBUG", "=INFO", "1NCCL=x", "NCCL DEBUG=INFO"])
def test_train_env_entries_must_be_key_value(item):
    with pytest.raises(ConfigError, match="train_env entries are KEY=VALUE") as err:
        TrainRequest(gpus=0, batch=2, train_env=[item]).check()
    assert "\n" not in str(err.value)
    assert TrainRequest(train_env=["NCCL_IB_HCA=mlx5_0,mlx5_1", "EMPTY="]).environment() == {
        "NCCL_IB_HCA": "mlx5_0,mlx5_1",
        "EMPTY": "",
    }


def test_syncer_uploads_each_new_checkpoint(tmp_path, monkeypatch):
    uploads: list[bytes] = []
    monkeypatch.setattr(training, "SYNC_SECONDS", 0.02)
    monkeypatch.setattr(training, "upload", lambda local, uri: uploads.append(Path(local).read_bytes()))
    ckpt = tmp_path / "model.pth"
    with training._Syncer(ckpt, "s3://b/model.pth"):
        ckpt.write_bytes(b"iteration 100")
        deadline = time.monotonic() + 5
        while not uploads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert uploads == [b"iteration 100"]
    assert uploads == [b"iteration 100"]  # unchanged since: no second upload at the end
