"""The train step: ``retinaflow train`` (under ``torchrun`` on GPUs) on the prepared dataset.

Resuming after a pod retry: the checkpoint lives at ``{checkpoint_root}/{run_name}/model.pth``,
where ``run_name`` is the KFP run's name (the same for every retry of the run). On ``s3://`` the
step downloads an existing checkpoint before starting (``retinaflow train`` resumes from it) and
uploads the local one whenever the trainer rewrites it, so a pod killed mid-training loses at most
``checkpoint_every`` iterations. A local ``checkpoint_root`` is used in place.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from retinaflow.config import Config
from retinaflow.errors import CheckpointError, ConfigError, RetinaflowError
from retinaflow.flags import TRAIN_FLAGS, Flag
from retinaflow.kubeflow.steps.common import (
    find_run_id,
    is_remote,
    reports_failure,
    tracking_enabled,
    upload,
)
from retinaflow.kubeflow.steps.data import DatasetManifest, load_manifest

log = logging.getLogger(__name__)

SYNC_SECONDS = 30.0


class TrainingFailed(RetinaflowError):
    """The training process exited with an error."""


@dataclass
class TrainRequest:
    """The train components' parameters. A field named like a flag of ``TRAIN_FLAGS`` is that config
    setting (same name in the pipeline, the components and ``retinaflow train``; see ``CONFIG_FLAGS``);
    the defaults are the config's. KFP needs each spelled in the component signatures too."""

    backbone: str = "resnet50"
    iters: int = 90000
    batch: int = 16
    lr: float = 5e-4
    precision: str = "auto"
    resize: int = 800
    max_size: int = 1333
    gpus: int = 1
    val_every: int = 0
    checkpoint_every: int = 1000
    backbone_weights: str = ""
    overrides: list[str] = field(default_factory=list)
    # KEY=VALUE environment of every training process (single pod and TrainJob nodes): NCCL's network
    # settings of a cluster (NCCL_SOCKET_IFNAME, NCCL_IB_HCA), NCCL_DEBUG=INFO, NCCL_NVLS_ENABLE=0.
    train_env: list[str] = field(default_factory=list)
    checkpoint_root: str = ""
    experiment: str = "retinaflow"
    run_name: str = "retinaflow"

    def settings(self) -> list[tuple[Flag, Any]]:
        """(flag, value) of the config fields; an empty string is unset (the config's None)."""
        return [(f, getattr(self, f.name)) for f in CONFIG_FLAGS if getattr(self, f.name) != ""]

    def check(self) -> None:
        """The values' own checks are the config's: build the config this request trains with."""
        if self.gpus < 0:
            raise ConfigError(f"gpus must be 0 (CPU) or more, got {self.gpus}")
        if self.gpus and self.batch % self.gpus:
            raise ConfigError(f"batch {self.batch} must be a multiple of gpus {self.gpus}")
        self.environment()
        config = Config()
        for flag, value in self.settings():
            config.set_key(flag.key, value)
        config.override(self.overrides)

    def environment(self) -> dict[str, str]:
        """``train_env`` as a mapping; ConfigError for an entry that is not KEY=VALUE."""
        env = {}
        for item in self.train_env:
            key, sep, value = item.partition("=")
            if not sep or not _ENV_NAME.fullmatch(key):
                raise ConfigError(f"train_env entries are KEY=VALUE with KEY a variable name, got {item!r}")
            env[key] = value
        return env


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: The flags (and config keys) that are pipeline parameters: those TrainRequest has a field for.
CONFIG_FLAGS = tuple(f for f in TRAIN_FLAGS if f.name in {x.name for x in fields(TrainRequest)})


@dataclass
class TrainResult:
    checkpoint: Path
    iterations: int
    mlflow_run_id: str
    checkpoint_uri: str

    def metadata(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "mlflow_run_id": self.mlflow_run_id,
            "checkpoint_uri": self.checkpoint_uri,
        }


def checkpoint_uri(req: TrainRequest, default_root: Path) -> str:
    """Where this run's checkpoint lives: stable across retries of one KFP run."""
    root = req.checkpoint_root.rstrip("/") or str(default_root)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", req.run_name).strip("-") or "run"
    return f"{root}/{safe}/model.pth"


def train_args(req: TrainRequest, data: DatasetManifest, checkpoint: str, tracked: bool) -> list[str]:
    """``-m retinaflow train CHECKPOINT ...``: what a Python launcher (python, torchrun) runs."""
    args = [
        "-m", "retinaflow", "train", checkpoint,
        "--images", data.train_images, "--annotations", data.train_annotations,
        "--val-images", data.val_images, "--val-annotations", data.val_annotations,
        "--set", f"infer.resize={req.resize}", "--set", f"infer.max_size={req.max_size}",
    ]  # fmt: skip
    for flag, value in req.settings():
        args += [flag.option, str(value)]
    for item in req.overrides:
        args += ["--set", item]
    if tracked:
        args += ["--mlflow", "--experiment", req.experiment, "--run-name", req.run_name]
    return args


def train_argv(req: TrainRequest, data: DatasetManifest, checkpoint: str, tracked: bool) -> list[str]:
    """The command line that trains: ``torchrun ... -m retinaflow train`` on GPUs, plain Python on CPU."""
    args = train_args(req, data, checkpoint, tracked)
    if req.gpus == 0:
        return [sys.executable, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={req.gpus}"]
    return [*launcher, *args]


@reports_failure("train")
def run_training(req: TrainRequest, dataset_dir: str | Path, model_path: str | Path) -> TrainResult:
    """Train on the dataset of ``dataset_dir``; copy the final checkpoint to ``model_path``."""
    from retinaflow.engine.checkpoint import load_checkpoint

    req.check()
    data = load_manifest(dataset_dir)
    out = Path(model_path)
    uri = checkpoint_uri(req, default_root=out.parent / "checkpoints")
    tracked = tracking_enabled()
    local = _local_checkpoint(uri, out.parent)
    argv = train_argv(req, data, str(local), tracked)
    log.info("training: %s", " ".join(argv))
    with _Syncer(local, uri if is_remote(uri) else None):
        code = subprocess.call(argv, env={**os.environ, **req.environment()})
    if code != 0:
        raise TrainingFailed(f"training exited with code {code} (checkpoint kept at {uri})")
    if not local.is_file():
        raise CheckpointError(f"training finished without writing {local}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, out)
    state = load_checkpoint(out)
    run_id = find_run_id(req.experiment, req.run_name) if tracked else ""
    return TrainResult(
        checkpoint=out, iterations=int(state["iteration"]), mlflow_run_id=run_id, checkpoint_uri=uri
    )


def _local_checkpoint(uri: str, scratch: Path) -> Path:
    """The local file the trainer writes; for s3:// a scratch copy seeded with the remote checkpoint."""
    if not is_remote(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    path = scratch / "resume" / "model.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from retinaflow.mlops.storage import download_if_exists
    except ImportError as exc:
        raise ConfigError("an s3:// checkpoint_root needs pip install 'retinaflow[mlops]'") from exc
    if download_if_exists(uri, path):
        log.info("resuming from %s", uri)
    return path


class _Syncer:
    """Uploads ``local`` to ``uri`` each time the trainer replaces it, and once more at the end."""

    def __init__(self, local: Path, uri: str | None) -> None:
        self.local, self.uri = local, uri
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.seen = self._stamp()

    def _stamp(self) -> float:
        return self.local.stat().st_mtime if self.local.is_file() else 0.0

    def _sync(self) -> None:
        stamp = self._stamp()
        if self.uri and stamp and stamp != self.seen:
            upload(self.local, self.uri)
            self.seen = stamp
            log.info("checkpoint synced to %s", self.uri)

    def _loop(self) -> None:
        while not self.stop.wait(SYNC_SECONDS):
            self._sync()

    def __enter__(self) -> _Syncer:
        if self.uri:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.uri:
            self.thread.join()
            self._sync()
