"""The TrainJob's command on two "nodes" of one host: the rehearsal of the Kubeflow Trainer path on CPU.

``trainjob_manifest`` gives every node the same ``torchrun -m retinaflow train ...``; Kubeflow Trainer's
torch plugin (``pkg/runtime/framework/plugins/torch/torch.go``) adds to each node's container
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` and ``PET_MASTER_ADDR``/``PET_MASTER_PORT``,
which torchrun reads as ``--nnodes`` ... ``--master-port`` (its default, static rendezvous on node 0).
Here the two nodes are two torchrun launches of that command on loopback, one gloo worker each, in
that environment (``trainer``), or with a c10d rendezvous (``PET_RDZV_BACKEND/ENDPOINT/ID``, the
``--rdzv-*`` flags: ``c10d``). What these tests cannot show: NCCL between hosts, more than one process
per node, S3 (the checkpoint here is a local path) and MLflow (``--mlflow`` is dropped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.engine.test_distributed import free_port, launch_env, logged_losses, train_cmd, writes
from tests.engine.test_distributed_faults import alive, exit_codes, wait_for, workers_of
from tests.kubeflow.steps.test_training_ddp import TINY

from retinaflow.engine.checkpoint import load_checkpoint
from retinaflow.kubeflow.steps.data import DatasetManifest
from retinaflow.kubeflow.steps.training import TrainRequest
from retinaflow.kubeflow.trainjob import TrainJobRequest, trainjob_manifest

RUN = "rehearsal"
TRACKING = ["--mlflow", "--experiment", "retinaflow", "--run-name", RUN]


def _job(
    synth: Any, tmp_path: Path, iters: int, checkpoint_every: int, gpus: int = 1
) -> tuple[dict[str, Any], Path]:
    """The TrainJob's ``spec.trainer`` for 2 nodes x ``gpus`` processes on the tiny dataset, and its
    checkpoint (global batch 2 images per process)."""
    paths = (synth.train_images, synth.train_annotations, synth.val_images, synth.val_annotations)
    data = DatasetManifest(*map(str, paths), fingerprint="f" * 64, num_train=24, num_val=6)
    train = TrainRequest(
        backbone="mobilenet_v2",
        iters=iters,
        batch=4 * gpus,  # global: 2 images per process
        precision="fp32",
        resize=128,
        max_size=128,
        gpus=gpus,
        checkpoint_every=checkpoint_every,
        overrides=TINY,
        checkpoint_root=str(tmp_path / "checkpoints"),
        run_name=RUN,
    )
    trainer = trainjob_manifest(TrainJobRequest(train=train, nodes=2), data)["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, gpus)
    return trainer, tmp_path / "checkpoints" / RUN / "model.pth"


def _args(trainer: dict[str, Any]) -> list[str]:
    """The TrainJob's ``-m retinaflow train CHECKPOINT ...`` without ``--mlflow`` (no server here)."""
    args = list(trainer["args"])
    assert args[-len(TRACKING) :] == TRACKING  # tracking is rank 0's MLflow sink, tested elsewhere
    return args[: -len(TRACKING)]


def _node_command(trainer: dict[str, Any]) -> list[str]:
    """Every node's command line: the TrainJob's, ``torchrun`` as this interpreter's module."""
    assert trainer["command"] == ["torchrun"]  # the console script of torch.distributed.run
    return [sys.executable, "-m", "torch.distributed.run", *_args(trainer)]


def _node_env(
    tmp_path: Path,
    trainer: dict[str, Any],
    rank: int,
    port: int,
    rendezvous: str,
    backend: str = "gloo",
    **hooks: str,
) -> dict[str, str]:
    """What the Trainer's torch plugin sets on node ``rank`` (master: node 0 on loopback). With NCCL each
    "node" sees its own GPUs, as a pod does: node r gets GPUs r*P .. r*P+P-1 of this host."""
    env = launch_env(tmp_path, backend, **hooks)
    if backend == "nccl":
        per_node = int(trainer["numProcPerNode"])
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(rank * per_node + i) for i in range(per_node))
    env.update(
        PET_NNODES=str(trainer["numNodes"]),
        PET_NPROC_PER_NODE=str(trainer["numProcPerNode"]),
        PET_NODE_RANK=str(rank),
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(port),
    )
    if rendezvous == "c10d":
        env.update(PET_RDZV_BACKEND="c10d", PET_RDZV_ENDPOINT=f"127.0.0.1:{port}", PET_RDZV_ID=RUN)
    return env


def _launch(
    tmp_path: Path, trainer: dict[str, Any], rendezvous: str, backend: str = "gloo", **hooks: str
) -> list[subprocess.Popen]:
    """Both nodes, started together; each one's output in ``tmp_path/node<rank>.log``."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        log = (tmp_path / f"node{rank}.log").open("w")
        env = _node_env(tmp_path, trainer, rank, port, rendezvous, backend, **hooks)
        nodes.append(subprocess.Popen(_node_command(trainer), env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return nodes


def _finish(nodes: list[subprocess.Popen], seconds: float) -> list[int]:
    """Exit codes of both nodes; kills what is still running after ``seconds`` (then fails)."""
    deadline = time.monotonic() + seconds
    try:
        return [node.wait(timeout=max(deadline - time.monotonic(), 0.1)) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()


# Two "nodes" of 2 GPUs each on a 4-GPU host, NCCL between all four ranks (the GPU machine's rehearsal).
NCCL_2X2 = pytest.param(
    "c10d",
    "nccl",
    2,
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs (2 nodes x 2)"),
    ],
    id="c10d-nccl-2x2",
)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("rendezvous", "backend", "gpus"),
    [("trainer", "gloo", 1), ("c10d", "gloo", 1), NCCL_2X2],
    ids=["trainer", "c10d", "c10d-nccl-2x2"],
)
def test_two_nodes_train_checkpoint_once_and_resume_on_one_process(
    synth_small, tmp_path, rendezvous, backend, gpus
):
    trainer, ckpt = _job(synth_small, tmp_path, iters=3, checkpoint_every=10_000, gpus=gpus)
    codes = _finish(_launch(tmp_path, trainer, rendezvous, backend), seconds=180)
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert writes(tmp_path) == [f"0 {ckpt}"]  # once, by global rank 0, at the end
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["model.pth"]
    state = load_checkpoint(ckpt)
    assert (state["iteration"], state["world_size"]) == (3, 2 * gpus)
    assert state["config"]["train"]["batch"] == 4 * gpus
    # global rank 0 logs (on whichever node c10d made it); validation gathered from both nodes, once
    said = logs[0] + logs[1]
    assert sorted(logged_losses(said)) == [1, 2, 3], said[-3000:]
    # train.grad_sync=auto: between nodes DDP, whose all-reduces overlap the backward
    assert "gradients averaged by DDP (train.grad_sync=auto: 2 nodes)" in said, said[-3000:]
    assert said.count("iteration 3: validation mAP") == 1, said[-3000:]

    if rendezvous == "c10d":
        return  # the resume does not depend on how the ranks met
    resumed = subprocess.run(  # the same command, on one process: plain Python
        [*train_cmd(*_args(trainer)[3:], nproc=0), "--iters", "4"],
        env=launch_env(tmp_path, "gloo"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was trained on 2 rank(s), resuming on 1: global batch 4, 4 per rank" in resumed.stderr
    assert sorted(logged_losses(resumed.stderr)) == [4]  # continued, not restarted
    assert (load_checkpoint(ckpt)["iteration"], load_checkpoint(ckpt)["world_size"]) == (4, 1)


@pytest.mark.timeout(300)
def test_sigterm_to_one_node_stops_both(synth_small, tmp_path):
    trainer, ckpt = _job(synth_small, tmp_path, iters=6, checkpoint_every=10_000)  # only the stop saves
    nodes = _launch(tmp_path, trainer, "trainer", pause="0:2")  # global rank 0 waits after its step 2
    try:
        wait_for(tmp_path / "paused", nodes[0])
        workers = {**workers_of(nodes[0].pid), **workers_of(nodes[1].pid)}
        assert sorted(workers) == [0, 1]
        nodes[1].send_signal(signal.SIGTERM)  # as the kubelet stops node 1's pod: its torchrun agent
        killed = time.monotonic()
        (tmp_path / "go").touch()
    finally:
        codes = _finish(nodes, seconds=90)
    stopped_in = time.monotonic() - killed
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert 0 not in codes, logs[0][-3000:] + logs[1][-3000:]
    assert stopped_in < 60, stopped_in
    assert not any(alive(pid) for pid in workers.values())
    assert exit_codes(logs[0]) == {0: 143}, logs[0][-3000:]  # left through TrainingInterrupted
    stopped = int(load_checkpoint(ckpt)["iteration"])
    assert stopped in (2, 3), logs[0][-3000:]
    said = [line for log in logs for line in log.splitlines() if line.startswith("retinaflow:")]
    assert len(said) == 1, said  # once, by global rank 0 on node 0
    assert said[0].startswith(f"retinaflow: error: interrupted at iteration {stopped};"), said
    assert writes(tmp_path) == [f"0 {ckpt}"]
    assert os.listdir(ckpt.parent) == ["model.pth"]
