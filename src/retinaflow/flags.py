"""Command-line flags ↔ config keys, one table per command.

A flag is named after the last part of its key (``train.checkpoint_every`` → ``--checkpoint-every``),
its type comes from the config field, and its value is set on the :class:`Config` directly
(:meth:`Config.set_key`, which coerces and range-checks it), not round-tripped through strings. The
pipeline's training parameters are the subset of ``TRAIN_FLAGS`` that ``TrainRequest`` names, under
the same names (``retinaflow.kubeflow.steps.training``). Anything else: ``--set section.key=value``.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from retinaflow.config import COMPILE_SHAPES, Config
from retinaflow.export.spec import PRECISIONS

_COMPILE = {"nargs": "?", "const": "inductor", "metavar": "BACKEND"}
_CHOICES = {
    "precision": ("auto", "fp32", "fp16", "bf16"),
    "loader": ("auto", "dali", "torch"),
    "cudnn_benchmark": ("auto", "on", "off"),
    "compile_shapes": COMPILE_SHAPES,
}


@dataclass(frozen=True)
class Flag:
    """One flag: its config ``key``, ``help``, the argparse ``group`` and any argparse ``extra``."""

    key: str
    help: str
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The argparse attribute, and the pipeline parameter: the key's last part."""
        return self.key.rsplit(".", 1)[-1]

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _table(*rows: str | tuple[Any, ...]) -> tuple[Flag, ...]:
    """Rows ``(key, help[, extra])``; a plain string starts an argparse group."""
    flags, group = [], ""
    for row in rows:
        if isinstance(row, str):
            group = row
        else:
            flags.append(Flag(row[0], row[1], group, *row[2:]))
    return tuple(flags)


TRAIN_FLAGS = _table(
    "data",
    ("data.images", "training images folder"),
    ("data.annotations", "training COCO instances JSON"),
    ("data.val_images", "validation images folder"),
    ("data.val_annotations", "validation COCO instances JSON"),
    ("data.resize", "eval shorter side (default 800)"),
    ("data.max_size", "cap on the longer side (default 1333)"),
    ("data.jitter", "train shorter side range", {"metavar": ("MIN", "MAX")}),
    ("data.workers", "DataLoader worker processes per rank"),
    ("data.loader", "data loader (default auto: dali on GPUs if installed)"),
    "model",
    ("model.backbone", "backbone name, e.g. resnet50, mobilenet_v2 (see `retinaflow backbones`)"),
    ("train.backbone_weights", "local ImageNet weights .pth for the backbone, or 'offline' (MobileNetV2)"),
    ("train.fine_tune", "start from a checkpoint (class count may differ)", {"metavar": "CKPT"}),
    "optimisation",
    ("train.iters", "iterations (default 90000)"),
    ("train.batch", "global batch size over all ranks (default 16)"),
    ("train.lr", "base learning rate (default 5e-4, for the default AdamW; SGD wants ~0.01)"),
    ("train.schedule", "scale iters-based warmup/milestones (ODTK --schedule)"),
    ("train.warmup", "warmup iterations (default 1000)"),
    ("train.milestones", "lr decay iterations of the step schedule (default 60000 80000)"),
    ("train.precision", "mixed precision"),
    ("train.compile", "torch.compile the network (default inductor; eager/aot_eager to debug)", _COMPILE),
    ("train.clip_grad", "max gradient norm (default 10; 0 = off)"),
    ("train.cuda_graph", "with --compile: replay the compiled forward and backward from CUDA graphs"),
    (
        "train.compile_shapes",
        "with --compile: one graph of symbolic size, in pad-stride blocks (blocks, default) or not "
        "(dynamic), or one per bucket (static)",
    ),
    ("train.compile_cache", "file of compile artifacts: read at start, rewritten after new compiles"),
    (
        "train.compile_package",
        "with --compile-cache: keep the compiled forward packaged in it, so that later starts skip "
        "dynamo (experimental)",
    ),
    ("train.cudnn_benchmark", "cuDNN autotuning (auto: on with shape buckets)"),
    ("train.seed", "random seed"),
    "run",
    ("train.val_every", "validate every N iterations (0 = at the end only)"),
    ("train.checkpoint_every", "checkpoint every N iterations"),
    ("train.log_every", "log metrics every N iterations"),
)
INFER_FLAGS = _table(
    ("infer.batch", "images per batch (default 8)"),
    ("infer.resize", "shorter side (default 800)"),
    ("infer.max_size", "cap on the longer side (default 1333)"),
    ("infer.precision", "autocast precision"),
    ("infer.score_thresh", "minimum score (default 0.05)"),
    ("infer.nms_iou", "NMS IoU threshold (default 0.5)"),
    ("infer.max_det", "detections per image (default 100)"),
    ("infer.top_n", "candidates per level before NMS (default 1000)"),
    ("infer.pad_stride", "pad batches to a multiple of this (default 32)"),
    ("infer.cuda_graph", "replay the network + post-processing as a CUDA graph"),
    ("infer.compile", "torch.compile the network (default inductor; compiles once per shape)", _COMPILE),
    ("infer.loader", "data loader (default auto: dali on GPUs if installed)"),
    ("infer.cudnn_benchmark", "cuDNN autotuning (default off: short passes do not repay it)"),
)

#: ``retinaflow export``; ``--batch`` and ``--size`` (one flag, two keys each) are the command's own.
EXPORT_FLAGS = _table(
    ("export.precision", "network precision (default fp32; int8: .onnx and .plan)", {"choices": PRECISIONS}),
    ("export.opset", "ONNX opset (>= 17)"),
    (
        "export.fuse_epilogues",
        ".pt2 on CUDA: conv + bias + ReLU (+ residual) in cuDNN's fused kernels (default on)",
        {"action": argparse.BooleanOptionalAction},
    ),
    "int8 (ModelOpt post-training quantization)",
    ("export.calibration_images", "images to calibrate on (default 512)", {"metavar": "N"}),
    (
        "export.calibration_data",
        "images folder and COCO JSON to draw them from (default: the checkpoint's training data)",
        {"metavar": ("IMAGES", "ANNOTATIONS")},
    ),
    ("export.int8_keep_head", "keep the head's last convolutions in floating point"),
)


def add_flags(parser: argparse.ArgumentParser, flags: tuple[Flag, ...]) -> None:
    """Add ``flags`` to ``parser`` (in their argparse groups), typed from the config fields; unset: None."""
    groups: dict[str, Any] = {}
    for flag in flags:
        target = parser
        if flag.group:
            target = groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        target.add_argument(flag.option, help=flag.help, default=None, **_kwargs(flag))


def _kwargs(flag: Flag) -> dict[str, Any]:
    hint = _field_type(flag.key)
    if isinstance(hint, types.UnionType):  # X | None -> X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kwargs: dict[str, Any] = {}
    if hint is bool:
        kwargs["action"] = "store_true"
    elif typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        kwargs.update(type=args[0], nargs="+" if args[-1] is Ellipsis else len(args))
    else:
        kwargs["type"] = hint
    if flag.name in _CHOICES:
        kwargs["choices"] = _CHOICES[flag.name]
    return {**kwargs, **flag.extra}


def _field_type(key: str) -> Any:
    hint: Any = Config
    for part in key.split("."):
        hint = typing.get_type_hints(hint)[part]
    return hint


def given(args: argparse.Namespace, flags: tuple[Flag, ...]) -> dict[str, Any]:
    """``{config key: value}`` of the flags given on the command line."""
    return {f.key: getattr(args, f.name) for f in flags if getattr(args, f.name, None) is not None}


def apply_flags(config: Config, args: argparse.Namespace, flags: tuple[Flag, ...]) -> Config:
    """Set every given flag on ``config`` (in place, typed and checked by the config); returns it."""
    for key, value in given(args, flags).items():
        config.set_key(key, value)
    return config
