"""Typed configuration: dataclasses with ODTK/paper defaults, YAML load/dump and dotted overrides.

Every part of the library takes one of these dataclasses instead of a long parameter list.
The resolved :class:`Config` is saved in every checkpoint (``Config.to_dict``) and restored
with ``Config.from_dict``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from retinaflow.errors import ConfigError

PRESETS = Path(__file__).parent / "configs"


@dataclass
class AnchorConfig:
    """Anchors per FPN level: ``len(ratios) * len(scales)`` per location, side ``size_factor * stride``."""

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    size_factor: float = 4.0

    @property
    def num_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)


@dataclass
class ModelConfig:
    """Detector architecture. ``backbone`` names an entry of ``retinaflow.model.backbones``."""

    backbone: str = "resnet50"
    num_classes: int = 80
    fpn_channels: int = 256
    head_convs: int = 4
    prior: float = 0.01
    # Backbone normalisation: "frozen_bn" (statistics and affine fixed, stem frozen: fine-tuning ImageNet
    # weights, as ODTK), "bn" / "sync_bn" (trained; sync_bn synchronises statistics over DDP ranks), "gn"
    # (GroupNorm, independent of the batch), or "auto": frozen_bn when training starts from weights
    # (train.backbone_weights or train.fine_tune), gn from random init. Resolved once, saved resolved.
    norm: str = "auto"
    # Normalisation in the head's subnets: "bn" (the default: a BatchNorm per pyramid level, as
    # detectron2's; folded into per-level convolutions at inference, so engines run the head at the cost of
    # "none": -0.34 ms of GPU time per batch-1 call of R50-FPN, and 0.6 AP points above gn on the
    # real-photo benchmark, docs/PERFORMANCE.md), "gn" (GroupNorm, as torchvision v2: independent of the
    # batch, computed in every inference call), "none" (paper, ODTK), or "auto": none when training starts
    # from weights, gn from random init.
    head_norm: str = "bn"
    anchors: AnchorConfig = field(default_factory=AnchorConfig)


@dataclass
class MatcherConfig:
    """Anchor–ground-truth assignment: IoU < ``bg_iou`` background, >= ``fg_iou`` foreground, else ignored."""

    fg_iou: float = 0.5
    bg_iou: float = 0.4
    allow_low_quality: bool = True  # torchvision's and detectron2's default (ODTK: false)


@dataclass
class LossConfig:
    """Sigmoid focal loss + a box loss, both normalised by the number of foreground anchors.

    ``box_loss``: "smooth_l1" (on encoded deltas, beta ``smooth_l1_beta``: paper, ODTK) or "giou"
    (generalized IoU of the decoded boxes, as torchvision's ``bbox_reg_loss_type="giou"``).
    """

    alpha: float = 0.25
    gamma: float = 2.0
    box_loss: str = "giou"  # measured best with the GN head (ODTK: smooth_l1, weight 1.0)
    smooth_l1_beta: float = 0.11
    box_weight: float = 2.0


@dataclass
class DataConfig:
    """Datasets and the torch DataLoader path. Paths may be local or (with retinaflow.mlops) ``s3://``."""

    images: str | None = None
    annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    resize: int = 800
    max_size: int = 1333
    jitter: tuple[int, int] = (640, 1024)
    flip: float = 0.5
    color_jitter: float = 0.1
    # Batches are padded to a multiple of this: 32, the backbone's stride, is all the network needs (FPN
    # levels P3-P5 divide exactly; P6/P7 and their anchors use ceil(H / stride), as the convolutions do).
    # ODTK padded to 128, its largest stride: up to 18 % more pixels at 800x1333 for the same images.
    pad_stride: int = 32
    workers: int = 4  # DataLoader worker processes of the torch loader (DALI always runs four threads)
    # Shape policy (data/shapes.py): "buckets" pads each batch to the smallest of a few canonical shapes
    # (aspect_groups x bucket_levels; a training batch holds one aspect-ratio group at one level of drawn
    # jitter); "stride" pads to a multiple of pad_stride (any number of shapes). COCO's sizes, default
    # jitter: 1.10 padded Mpx per image at 3 x 4 against 1.19 at 2 x 3 (1.35 grouping by aspect alone;
    # the images themselves: 0.91), docs/PERFORMANCE.md.
    shapes: str = "buckets"
    aspect_groups: int = 3
    bucket_levels: int = 4
    # "dali" (GPU decode + augment, needs retinaflow[dali]), "torch" (DataLoader workers), or "auto":
    # dali on a GPU when DALI is installed, torch otherwise. Training, its validation and infer.
    loader: str = "auto"

    def __post_init__(self) -> None:
        _require("data", self, resize=self.resize > 0, max_size=self.max_size > 0)


@dataclass
class TrainConfig:
    """Optimisation. ``schedule`` scales iterations, warmup and milestones (ODTK's habit).

    ``compile``: "" (off) or a ``torch.compile`` backend for the network: "inductor" on GPUs; "eager" or
    "aot_eager" to debug graph capture. With several padded shapes (buckets, multi-scale jitter) it
    compiles one graph of symbolic height and width (in blocks of the pad stride or not), or one per bucket
    (``compile_shapes``).
    ``compile_cache``: a file of the compiler's artifacts (``retinaflow.engine.compile_cache``), one set per
    GPU index: each rank reads its own at start; rewritten after the first step and at checkpoints when a
    rank compiled something new; "" for none.

    ``optimizer``: "adamw" (default) or "sgd" (momentum, paper/ODTK: lr 0.01, weight_decay 1e-4, step
    schedule; ``configs/retinanet_odtk.yaml``). ``lr_schedule``: "cosine" (to 0 at ``iters``, default) or
    "step" (decay by ``gamma`` at ``milestones``); both after the linear ``warmup``.

    The defaults (AdamW, lr 5e-4, weight decay 0.05, cosine, gradient clipping at 10) are what measured
    best on the real-photo benchmark (``benchmarks/bench_accuracy.py``, MobileNetV2-FPN, 500 iterations,
    3 seeds, H200): AP 0.790 against 0.758 for SGD 0.01 with steps; docs/PERFORMANCE.md has the table.
    """

    iters: int = 90000
    batch: int = 16
    lr: float = 5e-4
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 0.05
    warmup: int = 1000
    warmup_factor: float = 1 / 3
    milestones: tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    schedule: float = 1.0
    clip_grad: float = 10.0
    ema: float = 0.0
    precision: str = "auto"
    channels_last: bool = True
    compile: str = ""
    compile_cache: str = ""
    # With compile="inductor": the compiled forward and backward replayed from CUDA graphs (inductor's
    # triton.cudagraphs, as torch.compile(mode="reduce-overhead")), so the host launches a graph, not
    # hundreds of kernels. Each padded shape is recorded once. R50-FPN 800x1344, batch 8 per GPU, bf16, H200:
    # 225 img/s on one GPU against 132 compiled without graphs and 153 eager; 1.89x on 2 GPUs, 3.73x on 4
    # (docs/PERFORMANCE.md, fourteenth session). COCO's sizes (12 buckets), one H200: median step 216.5
    # img/s against 152.5 without graphs (twentieth session). Off by default until measured on 2 GPUs.
    cuda_graph: bool = False
    # With compile and several padded shapes: "blocks" (default) compiles one graph whose height and width
    # are symbolic multiples of data.pad_stride (engine/blocks.py: simpler shape arithmetic, fewer
    # shape guards), "dynamic" one graph of plain symbolic height and width, "static" one graph per
    # bucket. One H100, R50-FPN, batch 8, bf16, COCO's sizes (12 buckets), against "dynamic" in the same
    # session: cold compile 128 s against 218 s, iterations 1-1,000 from warm caches 111.6 against 104.9
    # img/s, steady steps 151.3 against 134.4 img/s (GPU 37.7 against 40.3 ms per step); one shape: 133.9
    # img/s (docs/PERFORMANCE.md, twenty-first session).
    compile_shapes: str = "blocks"
    # With compile and compile_cache: compile the forward ahead of time at the first step (dynamo's graph
    # with the backend's forward and backward, torch.compile(...).aot_compile()), train through it and keep
    # it in the compile-cache file, one per device; a later start runs the package without dynamo tracing
    # the network (first step 1.5 s instead of 9.3 s on an H200, COCO's sizes). Batches its guards refuse go
    # through the usual compiled network. Experimental in PyTorch, measured on 1 GPU only
    # (engine/compile_package.py, docs/PERFORMANCE.md). Not with cuda_graph, compile_shapes=static or a
    # DDP-wrapped network (grad_sync=ddp on several GPUs).
    compile_package: bool = False
    # Gradient averaging over ranks (several GPUs): "ddp" (DistributedDataParallel: bucketed all-reduces
    # overlapped with backward), "after_backward" (engine.distributed.GradientAverage: flat all-reduces
    # after backward; no DDP hooks, one compiled graph) or "auto" (engine.grad_sync.grad_sync_of):
    # after_backward when every rank is on one node (plain BatchNorm's running statistics are averaged
    # with the gradients), else ddp. R50-FPN batch 8 per GPU: after_backward 11-24 % faster than DDP on
    # two H100s (eager and compiled), 8 % on two H200s (eager) (docs/PERFORMANCE.md, 11th and 12th
    # sessions).
    grad_sync: str = "auto"
    # cuDNN autotuning: "off", "on", or "auto" (on when data.shapes bounds the shapes); see data/shapes.py.
    # Measured in fresh processes (H200, R50 batch 8, bench_cudnn.py): autotuning costs ~9 s per padded
    # shape (~55 s for 6 buckets) and then gains 1.2 % -- it repays itself only after ~80k iterations.
    cudnn_benchmark: str = "off"
    checkpoint_every: int = 1000
    val_every: int = 0
    log_every: int = 20
    seed: int = 0
    backbone_weights: str | None = None
    fine_tune: str | None = None

    def __post_init__(self) -> None:
        positive = {"iters": self.iters > 0, "batch": self.batch > 0, "lr": self.lr > 0}
        _require(
            "train",
            self,
            **positive,
            checkpoint_every=self.checkpoint_every >= 0,
            grad_sync=self.grad_sync in GRAD_SYNCS,
            compile_shapes=self.compile_shapes in COMPILE_SHAPES,
        )

    def scaled(self, value: int) -> int:
        return round(value * self.schedule)


@dataclass
class InferConfig:
    """Post-processing and batched inference defaults."""

    score_thresh: float = 0.05
    top_n: int = 1000
    nms_iou: float = 0.5
    max_det: int = 100
    batch: int = 8
    precision: str = "auto"
    resize: int = 800
    max_size: int = 1333
    # Inference batches are padded to a multiple of this (training pads to data.pad_stride): 32, as
    # data.pad_stride.
    pad_stride: int = 32
    cuda_graph: bool = False
    # "" (off) or a torch.compile backend for the network ("inductor" on GPUs: fuses each conv's bias,
    # ReLU and residual add into one kernel). Compiles once per new input shape.
    compile: str = ""
    # as train.cudnn_benchmark; "off" by default: inference gains 1 % from autotuning, after ~2.7 s per
    # padded shape (R50 batch 8, fp16; bench_cudnn.py).
    cudnn_benchmark: str = "off"
    loader: str = "auto"  # as data.loader

    def __post_init__(self) -> None:
        _require("infer", self, nms_iou=0.0 <= self.nms_iou <= 1.0, max_det=self.max_det >= 1)


@dataclass
class ExportConfig:
    """ONNX / AOTInductor (.pt2) / TensorRT export.

    ``height``/``width`` 0: from the checkpoint's inference settings (see ``retinaflow.export.spec``).
    ``min_batch``..``max_batch``: the engine's batch range (one value: a fixed batch).
    ``postprocess``: ONNX graphs end with decode + NMS (standard ONNX ops) and fixed-size detections;
    off, they return the raw head maps (the TensorRT plugin route).
    TensorRT only: ``opt_batch`` the profile's optimum (0: ``max_batch``), the builder's workspace limit,
    optimisation level and a timing cache file (read if present, written after the build; "" for none).
    ``precision`` "int8" (.onnx, .plan): ModelOpt post-training quantization calibrated on
    ``calibration_images`` images drawn (seeded) from ``calibration_data`` (images folder, COCO JSON; None:
    the checkpoint's ``data.images`` / ``data.annotations``); ``int8_keep_head`` leaves the head's last
    convolutions in floating point (``retinaflow.export.quantize.HEAD_LAST_CONVS``).
    ``fuse_epilogues`` (.pt2 on CUDA): convolution + bias + ReLU (+ residual) as cuDNN's fused kernels
    where they time faster (``retinaflow.export.fuse``): +10-20 % at batch 32 on an H100
    (docs/PERFORMANCE.md).
    """

    opset: int = 17
    height: int = 0
    width: int = 0
    dynamic_batch: bool = True
    precision: str = "fp32"
    min_batch: int = 1
    max_batch: int = 32
    postprocess: bool = True
    opt_batch: int = 0
    workspace_gib: float = 4.0
    optimization_level: int = 3
    timing_cache: str = ""
    calibration_images: int = 512
    calibration_data: tuple[str, str] | None = None
    int8_keep_head: bool = False
    fuse_epilogues: bool = True

    def __post_init__(self) -> None:
        pair = self.calibration_data is None or len(self.calibration_data) == 2
        _require("export", self, calibration_images=self.calibration_images > 0, calibration_data=pair)


@dataclass
class Config:
    """The whole resolved configuration of a run; saved in checkpoints and tracking runs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        model = data.get("model")
        if isinstance(model, dict) and "frozen_bn" in model:  # checkpoints written before model.norm
            model = dict(model)
            model.setdefault("norm", "frozen_bn" if model.pop("frozen_bn") else "bn")
            model.setdefault("head_norm", "none")  # their head had no norm (the default is gn now)
            data = {**data, "model": model}
        return _build(cls, data, "")

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a YAML file, or a preset shipped with the package by name (e.g. ``synthetic_cpu``)."""
        p = Path(path)
        if not p.is_file() and p.suffix == "" and (PRESETS / f"{p.name}.yaml").is_file():
            p = PRESETS / f"{p.name}.yaml"
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        return cls.from_dict(data)

    def override(self, assignments: list[str]) -> Config:
        """Apply ``section.key=value`` strings (values parsed as YAML); returns a new Config."""
        config = copy.deepcopy(self)
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            key, raw = item.split("=", 1)
            config.set_key(key.strip(), yaml.safe_load(raw))
        return config

    def set_key(self, key: str, value: Any) -> None:
        """Set the dotted ``key`` to ``value``, coerced to its field's type, checked by its section."""
        *path, leaf = key.split(".")
        node: Any = self
        for part in path:
            node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"unknown config key {key!r}")
        setattr(node, leaf, _coerce(typing.get_type_hints(type(node))[leaf], value, key))
        if hasattr(node, "__post_init__"):
            node.__post_init__()  # the section's range checks


GRAD_SYNCS = ("auto", "ddp", "after_backward")
COMPILE_SHAPES = ("dynamic", "blocks", "static")
_RULES = {
    "grad_sync": f"be one of {', '.join(GRAD_SYNCS)}",
    "compile_shapes": f"be one of {', '.join(COMPILE_SHAPES)}",
    "nms_iou": "be in [0, 1]",
    "max_det": "be >= 1",
    "checkpoint_every": "be >= 0 (0: off)",
    "calibration_data": "be [images folder, annotations JSON]",
}


def _require(section: str, obj: Any, **ok: bool) -> None:
    """The one range check of each value: ``ConfigError`` for the first field whose rule fails. Runs
    whenever a section is built: defaults, YAML files, checkpoints, ``--set`` and flags (``set_key``)."""
    for name, passed in ok.items():
        if not passed:
            rule = _RULES.get(name, "be positive")
            raise ConfigError(f"{section}.{name} must {rule}, got {getattr(obj, name)}")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or '<root>'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key {prefix + sorted(unknown)[0]!r}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, key) for v in value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, key) for v in value]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return str(value)
    return value
