"""Anchor-to-ground-truth assignment for a whole batch at once, on the tensors' device.

The configured entry point of :func:`retinaflow.ops.matching.match`: CUDA tensors run the ``match``
kernel (the IoU matrix is never stored), CPU tensors the chunked PyTorch reference
(``retinaflow.ops._reference``); both give identical assignments.
"""

from __future__ import annotations

import torch

from retinaflow.config import MatcherConfig
from retinaflow.errors import ConfigError, DataError
from retinaflow.ops import matching
from retinaflow.ops._reference import BACKGROUND, IGNORE, pairwise_iou

__all__ = ["BACKGROUND", "IGNORE", "match", "pairwise_iou"]


def match(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    cfg: MatcherConfig,
    backend: str | None = None,
) -> torch.Tensor:
    """Assign every anchor of every image.

    anchors:   (N, 4) float x1y1x2y2 in input pixels (the levels concatenated).
    gt_boxes:  (B, M, 4) float x1y1x2y2 in input pixels; rows with label -1 are padding.
    gt_labels: (B, M) int64, class index, -1 for padding (padding never matches).
    Returns (B, N) int64: the index (0..M-1) of the matched ground truth when the anchor's best IoU is
    >= ``cfg.fg_iou``, -1 (background) when it is < ``cfg.bg_iou``, -2 (ignored) in between. With
    ``cfg.allow_low_quality`` every ground truth's best anchors (all ties, IoU > 0) also become foreground,
    matched to their own best ground truth, as torchvision's Matcher does.
    backend: ``"auto"`` (kernel for CUDA tensors when available), ``"cuda"`` or ``"reference"``.
    """
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise DataError(f"anchors must be (N, 4), got {tuple(anchors.shape)}")
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4 or gt_labels.shape != gt_boxes.shape[:2]:
        raise DataError(
            f"ground truth must be boxes (B, M, 4) and labels (B, M), got {tuple(gt_boxes.shape)} "
            f"and {tuple(gt_labels.shape)}"
        )
    if not cfg.bg_iou <= cfg.fg_iou:
        raise ConfigError(f"matcher.bg_iou ({cfg.bg_iou}) must not exceed matcher.fg_iou ({cfg.fg_iou})")
    return matching.match(
        anchors, gt_boxes, gt_labels, cfg.fg_iou, cfg.bg_iou, cfg.allow_low_quality, backend=backend
    )
