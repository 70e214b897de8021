"""``retinaflow train``: a YAML config, then the flags of ``retinaflow.flags.TRAIN_FLAGS``, then ``--set``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from retinaflow.commands.optional import add_tracking_args, remote, tracking_callbacks
from retinaflow.config import Config
from retinaflow.engine.callbacks import Callback, TrainState
from retinaflow.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from retinaflow.flags import TRAIN_FLAGS, add_flags, apply_flags


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector (resumes if MODEL exists)",
        description="Train RetinaNet on a COCO-format dataset. If MODEL already exists, training resumes "
        "from it exactly. Launch with `torchrun --nproc_per_node N -m retinaflow train ...` "
        "for several GPUs.",
    )
    p.add_argument("model", help="checkpoint to write (and to resume from if it exists); may be s3://")
    add_flags(p, TRAIN_FLAGS)
    p.add_argument("--classes", type=int, help="expected number of classes (checked against the dataset)")
    _add_config_args(p)
    add_tracking_args(p)
    p.set_defaults(func=_cmd_train)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", help="YAML config (see configs/); flags override it")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. loss.gamma=1.5",
    )


def _load_config(args: argparse.Namespace) -> Config:
    """The YAML config (or defaults), then the flags, then ``--set``: later wins."""
    config = apply_flags(Config.load(args.config) if args.config else Config(), args, TRAIN_FLAGS)
    return config.override(list(args.set))


def _cmd_train(args: argparse.Namespace) -> int:
    config = _load_config(args)
    target = args.model
    data = config.data
    for name in _DATA_PATHS:  # paths may come from the YAML config: resolve them like flags
        setattr(args, name, getattr(data, name))
    with remote(args, inputs=_DATA_PATHS, resume=("model",)):
        for name in _DATA_PATHS:
            value = getattr(args, name)
            setattr(data, name, None if value is None else str(value))
        callbacks = tracking_callbacks(args, config)
        if args.classes is not None:
            callbacks.append(_ClassCountCheck(args.classes))
        _train_naming(target, config, Path(args.model), callbacks)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns here; one line is enough
        print(f"checkpoint: {target}")
    return 0


def _train_naming(target: str, config: Config, local: Path, callbacks: list[Callback]) -> None:
    """Train on ``local``; a stop or divergence message names ``target`` (e.g. the ``s3://`` URI the
    checkpoint is uploaded to on exit), not the staging file that is deleted by then."""
    from retinaflow.engine.train import train

    try:
        train(config, local, callbacks)
    except (TrainingInterrupted, TrainingDiverged) as exc:
        if not target.startswith("s3://"):
            raise
        raise type(exc)(str(exc).replace(str(local), target)) from exc


_DATA_PATHS = ("images", "annotations", "val_images", "val_annotations")


class _ClassCountCheck(Callback):
    """Fails fast when --classes disagrees with the dataset's category count."""

    def __init__(self, expected: int) -> None:
        self.expected = expected

    def on_train_start(self, state: TrainState) -> None:
        found = state.config.model.num_classes
        if found != self.expected:
            raise ConfigError(f"--classes {self.expected} but the annotations define {found} categories")


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
