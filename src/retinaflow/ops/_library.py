"""The ``retinaflow::`` operators (decode, nms, match, group_norm and its backward, colour_jitter), declared
once.

Importing :mod:`retinaflow.ops` defines them with their CPU implementation (the reference,
:mod:`._reference`) and their fake implementation (torch.compile, torch.export, tracing). The CUDA
implementation is the compiled library (``kernels/torch/ops.cpp``), registered when :mod:`._ext` loads it,
or the reference again where the kernels cannot be built (:func:`register_reference_for_cuda`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from retinaflow.ops import _reference

# Limits of the decode kernel (RF_DECODE_MAX_* in kernels/decode.h; tests/ops/test_ext.py checks they agree).
MAX_LEVELS = 8
MAX_TOP_N = 16384
# Channels the group_norm kernel takes (kMaxChannels in kernels/group_norm.cu).
MAX_NORM_CHANNELS = 4096

SCHEMAS = {
    "decode": "(Tensor[] cls, Tensor[] box, Tensor[] anchors, Tensor sizes, float score_thresh, int top_n, "
    "int capacity) -> (Tensor, Tensor, Tensor)",
    "nms": "(Tensor scores, Tensor boxes, Tensor classes, float iou_threshold, int max_det) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "match": "(Tensor anchors, Tensor gt_boxes, Tensor gt_labels, float fg_iou, float bg_iou, "
    "bool allow_low_quality) -> Tensor",
    "group_norm": "(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps) "
    "-> (Tensor, Tensor, Tensor)",
    "group_norm_backward": "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, int groups) "
    "-> (Tensor, Tensor, Tensor)",
    "colour_jitter": "(Tensor images, Tensor sizes, Tensor factors) -> Tensor",
}
REFERENCE: dict[str, Callable[..., object]] = {
    "decode": _reference.decode,
    "nms": _reference.nms,
    "match": _reference.match,
    "group_norm": _reference.group_norm,
    "group_norm_backward": _reference.group_norm_backward,
    "colour_jitter": _reference.colour_jitter,
}


def _decode_fake(
    cls: list[torch.Tensor],
    box: list[torch.Tensor],
    anchors: list[torch.Tensor],
    sizes: torch.Tensor,
    score_thresh: float,
    top_n: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, slots, device = cls[0].shape[0], len(cls) * top_n, cls[0].device
    return (
        torch.empty(batch, slots, dtype=torch.float32, device=device),
        torch.empty(batch, slots, 4, dtype=torch.float32, device=device),
        torch.empty(batch, slots, dtype=torch.int64, device=device),
    )


def _nms_fake(
    scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, iou_threshold: float, max_det: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, device = scores.shape[0], scores.device
    return (
        torch.empty(batch, max_det, dtype=torch.float32, device=device),
        torch.empty(batch, max_det, 4, dtype=torch.float32, device=device),
        torch.empty(batch, max_det, dtype=torch.int64, device=device),
        torch.empty(batch, dtype=torch.int64, device=device),
    )


def _match_fake(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
) -> torch.Tensor:
    return torch.empty(gt_labels.shape[0], anchors.shape[0], dtype=torch.int64, device=anchors.device)


def _group_norm_fake(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = torch.empty(x.shape[0], groups, dtype=_reference.norm_acc_dtype(x), device=x.device)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _group_norm_backward_fake(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    param = torch.empty(x.shape[1], dtype=mean.dtype, device=x.device)
    return torch.empty_like(x), param, torch.empty_like(param)


def _colour_jitter_fake(images: torch.Tensor, sizes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(images, memory_format=torch.channels_last)


FAKE: dict[str, Callable[..., object]] = {
    "decode": _decode_fake,
    "nms": _nms_fake,
    "match": _match_fake,
    "group_norm": _group_norm_fake,
    "group_norm_backward": _group_norm_backward_fake,
    "colour_jitter": _colour_jitter_fake,
}
_registered: set[str] = set()


def register_ops() -> None:
    """Define the operators with their CPU and fake implementations, once per process."""
    if "CPU" in _registered:
        return
    for name, schema in SCHEMAS.items():
        torch.library.define(f"retinaflow::{name}", schema)
        torch.library.impl(f"retinaflow::{name}", "CPU", REFERENCE[name])
        torch.library.register_fake(f"retinaflow::{name}", FAKE[name])
    _registered.add("CPU")


def register_reference_for_cuda() -> None:
    """Make the reference the CUDA implementation too (no kernels in this process), once."""
    if "CUDA" in _registered:
        return
    for name in SCHEMAS:
        torch.library.impl(f"retinaflow::{name}", "CUDA", REFERENCE[name])
    _registered.add("CUDA")


register_ops()
