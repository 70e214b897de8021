"""The pipeline's train step on all the machine's GPUs (2 or more): its torchrun launcher
(``--nproc-per-node`` = the pod's GPUs) run for real on a tiny dataset, tracking off (no MLflow needed)."""

from __future__ import annotations

import re

import pytest
import torch
from tests.engine.test_distributed import NCCL, logged_losses

from retinaflow.engine.checkpoint import load_checkpoint
from retinaflow.kubeflow.steps.data import DatasetManifest
from retinaflow.kubeflow.steps.training import TrainRequest, run_training

TINY = [  # MobileNetV2-FPN, small, random init (tests/conftest.py tiny_config as overrides)
    "model.fpn_channels=32",
    "model.head_convs=1",
    "matcher.allow_low_quality=true",
    "data.jitter=[96, 128]",
    "data.workers=0",
    "train.warmup=2",
    "train.milestones=[4]",
    "train.log_every=1",
    "infer.batch=4",
]


# gloo: the same launcher on 2 CPU processes (drop the skip to try this test without GPUs); the CPU time
# goes to tests/engine/test_distributed*.py, which run the same torchrun command.
GLOO = pytest.param("gloo", marks=pytest.mark.skip(reason="CPU time; tests/engine covers torchrun on gloo"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", [GLOO, NCCL])
def test_train_step_runs_torchrun_on_the_pods_gpus(synth_small, tmp_path, monkeypatch, capfd, backend):
    monkeypatch.setenv("RETINAFLOW_NO_MLFLOW", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gpus = max(2, torch.cuda.device_count()) if backend == "nccl" else 2
    if backend == "gloo":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    else:
        monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    s = synth_small
    paths = (s.train_images, s.train_annotations, s.val_images, s.val_annotations)
    DatasetManifest(*map(str, paths), fingerprint="f" * 64, num_train=24, num_val=6).save(dataset)
    req = TrainRequest(
        backbone="mobilenet_v2",
        iters=4,
        batch=2 * gpus,
        precision="fp32",
        resize=128,
        max_size=128,
        gpus=gpus,
        checkpoint_every=2,
        overrides=TINY,
        checkpoint_root=str(tmp_path / "checkpoints"),
        run_name="ddp",
    )
    result = run_training(req, dataset, tmp_path / "out" / "model")
    captured = capfd.readouterr()
    err = captured.err

    assert result.iterations == 4 and result.mlflow_run_id == ""
    state = load_checkpoint(result.checkpoint)
    assert (state["iteration"], state["world_size"]) == (4, gpus)  # trained by one rank per GPU
    assert load_checkpoint(tmp_path / "checkpoints" / "ddp" / "model.pth")["iteration"] == 4
    # one process logged: each iteration, the validation and the checkpoint line once
    assert sorted(logged_losses(err)) == [1, 2, 3, 4], err[-3000:]
    assert len(re.findall(r"iteration 4: validation mAP \d", err)) == 1, err[-3000:]
    assert re.findall(r"^checkpoint: .*$", captured.out, re.M) == [f"checkpoint: {result.checkpoint_uri}"]
