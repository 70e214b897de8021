"""The ``retinaflow::decode`` / ``retinaflow::nms`` / ``retinaflow::match`` operators: schema (declared
here, once), the CPU implementation (the reference) and the fake implementation used by torch.compile,
torch.export and tracing. The CUDA implementation is registered by the compiled library
(``kernels/torch/ops.cpp``, a ``TORCH_LIBRARY_IMPL`` block) when :mod:`retinaflow.ops._ext` loads it.
"""

from __future__ import annotations

import torch

from retinaflow.ops import _reference

DECODE = "retinaflow::decode"
NMS = "retinaflow::nms"
MATCH = "retinaflow::match"
DECODE_SIGNATURE = (
    "(Tensor[] cls, Tensor[] box, Tensor[] anchors, Tensor sizes, float score_thresh, int top_n, "
    "int capacity) -> (Tensor, Tensor, Tensor)"
)
NMS_SIGNATURE = (
    "(Tensor scores, Tensor boxes, Tensor classes, float iou_threshold, int max_det) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)

MATCH_SIGNATURE = (
    "(Tensor anchors, Tensor gt_boxes, Tensor gt_labels, float fg_iou, float bg_iou, bool allow_low_quality) "
    "-> Tensor"
)


def _decode_cpu(
    cls: list[torch.Tensor],
    box: list[torch.Tensor],
    anchors: list[torch.Tensor],
    sizes: torch.Tensor,
    score_thresh: float,
    top_n: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # ``capacity`` only tunes the kernels' fast path; the reference has no such limit.
    return _reference.decode(cls, box, anchors, sizes, score_thresh, top_n)


def _decode_fake(
    cls: list[torch.Tensor],
    box: list[torch.Tensor],
    anchors: list[torch.Tensor],
    sizes: torch.Tensor,
    score_thresh: float,
    top_n: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, slots = cls[0].shape[0], len(cls) * top_n
    device = cls[0].device
    return (
        torch.empty(batch, slots, dtype=torch.float32, device=device),
        torch.empty(batch, slots, 4, dtype=torch.float32, device=device),
        torch.empty(batch, slots, dtype=torch.int64, device=device),
    )


def _nms_cpu(
    scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, iou_threshold: float, max_det: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _reference.nms(scores, boxes, classes, iou_threshold, max_det)
    return d.scores, d.boxes, d.classes, d.counts


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


_registered = False


def register() -> None:
    """Define the operators with their CPU and fake implementations, once per process."""
    global _registered
    if _registered:
        return
    torch.library.define(DECODE, DECODE_SIGNATURE)
    torch.library.define(NMS, NMS_SIGNATURE)
    torch.library.define(MATCH, MATCH_SIGNATURE)
    torch.library.impl(DECODE, "CPU", _decode_cpu)
    torch.library.impl(NMS, "CPU", _nms_cpu)
    torch.library.impl(MATCH, "CPU", _reference.match)
    torch.library.register_fake(DECODE, _decode_fake)
    torch.library.register_fake(NMS, _nms_fake)
    torch.library.register_fake(MATCH, _match_fake)
    _registered = True


register()
