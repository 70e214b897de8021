"""``retinaflow train``: ODTK-style flags and YAML configs mapped onto :class:`~retinaflow.config.Config`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from retinaflow.commands.optional import add_tracking_args, remote, tracking_callbacks
from retinaflow.config import Config
from retinaflow.engine.callbacks import Callback, TrainState
from retinaflow.errors import ConfigError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector (resumes if MODEL exists)",
        description="Train RetinaNet on a COCO-format dataset. If MODEL already exists, training resumes "
        "from it exactly. Launch with `torchrun --nproc_per_node N -m retinaflow train ...` "
        "for several GPUs.",
    )
    p.add_argument("model", help="checkpoint to write (and to resume from if it exists); may be s3://")
    data = p.add_argument_group("data")
    data.add_argument("--images", help="training images folder")
    data.add_argument("--annotations", help="training COCO instances JSON")
    data.add_argument("--val-images", help="validation images folder")
    data.add_argument("--val-annotations", help="validation COCO instances JSON")
    data.add_argument("--resize", type=int, help="eval shorter side (default 800)")
    data.add_argument("--max-size", type=int, help="cap on the longer side (default 1333)")
    data.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="train shorter side range")
    data.add_argument("--workers", type=int, help="DataLoader worker processes per rank")
    data.add_argument(
        "--loader",
        choices=["auto", "dali", "torch"],
        help="data loader (default auto: dali on GPUs if installed)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--backbone", help="backbone name, e.g. resnet50, mobilenet_v2 (see `retinaflow backbones`)"
    )
    model.add_argument("--classes", type=int, help="expected number of classes (checked against the dataset)")
    model.add_argument(
        "--backbone-weights", help="local ImageNet weights .pth for the backbone, or 'offline' (MobileNetV2)"
    )
    model.add_argument("--fine-tune", metavar="CKPT", help="start from a checkpoint (class count may differ)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--iters", type=int, help="iterations (default 90000)")
    opt.add_argument("--batch", type=int, help="global batch size over all ranks (default 16)")
    opt.add_argument("--lr", type=float, help="base learning rate (default 0.01)")
    opt.add_argument("--schedule", type=float, help="scale iters-based warmup/milestones (ODTK --schedule)")
    opt.add_argument("--warmup", type=int, help="warmup iterations (default 1000)")
    opt.add_argument("--milestones", type=int, nargs="+", help="lr decay iterations (default 60000 80000)")
    opt.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="mixed precision")
    opt.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile the network (default backend inductor; eager/aot_eager to debug)",
    )
    opt.add_argument("--clip-grad", type=float, help="max gradient norm (0 = off)")
    opt.add_argument(
        "--cudnn-benchmark",
        choices=["auto", "on", "off"],
        help="cuDNN autotuning (auto: on with shape buckets)",
    )
    opt.add_argument("--seed", type=int, help="random seed")
    run = p.add_argument_group("run")
    run.add_argument("--val-every", type=int, help="validate every N iterations (0 = at the end only)")
    run.add_argument("--checkpoint-every", type=int, help="checkpoint every N iterations")
    run.add_argument("--log-every", type=int, help="log metrics every N iterations")
    _add_config_args(p)
    add_tracking_args(p)
    p.set_defaults(func=_cmd_train)


_TRAIN_FLAGS = {
    "images": "data.images",
    "annotations": "data.annotations",
    "val_images": "data.val_images",
    "val_annotations": "data.val_annotations",
    "resize": "data.resize",
    "max_size": "data.max_size",
    "jitter": "data.jitter",
    "workers": "data.workers",
    "loader": "data.loader",
    "backbone": "model.backbone",
    "backbone_weights": "train.backbone_weights",
    "fine_tune": "train.fine_tune",
    "iters": "train.iters",
    "batch": "train.batch",
    "lr": "train.lr",
    "schedule": "train.schedule",
    "warmup": "train.warmup",
    "milestones": "train.milestones",
    "precision": "train.precision",
    "clip_grad": "train.clip_grad",
    "cudnn_benchmark": "train.cudnn_benchmark",
    "compile": "train.compile",
    "seed": "train.seed",
    "val_every": "train.val_every",
    "checkpoint_every": "train.checkpoint_every",
    "log_every": "train.log_every",
}


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


def _load_config(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    config = Config.load(args.config) if args.config else Config()
    overrides = []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return config.override(overrides + list(args.set))


def _cmd_train(args: argparse.Namespace) -> int:
    from retinaflow.engine.train import train

    config = _load_config(args, _TRAIN_FLAGS)
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
        train(config, Path(args.model), callbacks)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns here; one line is enough
        print(f"checkpoint: {target}")
    return 0


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
