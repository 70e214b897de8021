"""Anchor matching op, dispatched by the tensors' device like the post-processing ops.

CUDA tensors go to the ``match`` kernel (``kernels/match.cu``: one thread per anchor, the IoU matrix is
never stored) when the kernels can be loaded; CPU tensors, and machines without them, use the chunked
PyTorch reference (:func:`retinaflow.ops._reference.match`), which defines the semantics. ``backend`` as in
:mod:`retinaflow.ops.dispatch` (``"auto"``, ``"cuda"``, ``"reference"``; ``RETINAFLOW_OPS_BACKEND``).
"""

from __future__ import annotations

import torch

from retinaflow.ops import _ext, _reference
from retinaflow.ops._reference import BACKGROUND, IGNORE
from retinaflow.ops.dispatch import use_kernels

__all__ = ["BACKGROUND", "IGNORE", "match"]


def match(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
    backend: str | None = None,
) -> torch.Tensor:
    """Assign every anchor of every image to a ground truth, the background or nothing.

    anchors: (N, 4) float x1y1x2y2; gt_boxes: (B, M, 4) float x1y1x2y2; gt_labels: (B, M) int, < 0 for
    padding rows (they never match). Returns (B, N) int64: the matched ground truth's row when the
    anchor's best IoU is >= ``fg_iou``, :data:`BACKGROUND` (-1) when it is < ``bg_iou``, :data:`IGNORE`
    (-2) in between; with ``allow_low_quality`` each ground truth's best anchors (all ties, IoU > 0) are
    also matched, to their own best ground truth. Inputs are assumed valid (see ``model.matcher``).
    """
    if use_kernels(anchors, backend):
        return _ext.match(anchors, gt_boxes, gt_labels, fg_iou, bg_iou, allow_low_quality)
    return _reference.match(anchors, gt_boxes, gt_labels, fg_iou, bg_iou, allow_low_quality)
