"""Anchor-to-ground-truth assignment for a whole batch at once: one ``torch.ops.retinaflow.match`` call.

CUDA tensors run the ``match`` kernel (``kernels/match.cu``: one thread per anchor, the IoU matrix is never
stored); CPU tensors the chunked PyTorch reference (:func:`retinaflow.ops._reference.match`), which defines
the semantics; both give identical assignments.
"""

from __future__ import annotations

import torch

from retinaflow.config import MatcherConfig
from retinaflow.errors import ConfigError, DataError
from retinaflow.ops import _ext
from retinaflow.ops._reference import BACKGROUND, IGNORE

__all__ = ["BACKGROUND", "IGNORE", "match_anchors"]


def match_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, cfg: MatcherConfig
) -> torch.Tensor:
    """Assign every anchor of every image to a ground truth, the background or nothing.

    anchors:   (N, 4) float x1y1x2y2 in input pixels (the levels concatenated).
    gt_boxes:  (B, M, 4) float x1y1x2y2 in input pixels; rows with label -1 are padding.
    gt_labels: (B, M) int64, class index, -1 for padding (padding never matches).
    Returns (B, N) int64: the index (0..M-1) of the matched ground truth when the anchor's best IoU is
    >= ``cfg.fg_iou``, :data:`BACKGROUND` (-1) when it is < ``cfg.bg_iou``, :data:`IGNORE` (-2) in between.
    With ``cfg.allow_low_quality`` every ground truth's best anchors (all ties, IoU > 0) also become
    foreground, matched to their own best ground truth, as torchvision's Matcher does.
    Errors name their source: anchors and thresholds come from the config (:class:`ConfigError`, as in
    :mod:`retinaflow.ops.boxes`), the ground truth from the data (:class:`DataError`).
    """
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ConfigError(f"anchors must be (N, 4), got {tuple(anchors.shape)}")
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4 or gt_labels.shape != gt_boxes.shape[:2]:
        raise DataError(
            f"ground truth must be boxes (B, M, 4) and labels (B, M), got {tuple(gt_boxes.shape)} "
            f"and {tuple(gt_labels.shape)}"
        )
    if not cfg.bg_iou <= cfg.fg_iou:
        raise ConfigError(f"matcher.bg_iou ({cfg.bg_iou}) must not exceed matcher.fg_iou ({cfg.fg_iou})")
    _ext.ensure_loaded_for(anchors)
    return torch.ops.retinaflow.match(
        anchors, gt_boxes, gt_labels, float(cfg.fg_iou), float(cfg.bg_iou), bool(cfg.allow_low_quality)
    )
