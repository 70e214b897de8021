"""Anchor-to-ground-truth assignment for a whole batch at once, on the tensors' device.

Memory: the IoU of every anchor with every ground truth is ``B * N * M`` float32 values (B images, N
anchors, M padded ground truths per image); computing it needs about three such buffers at once. For
16 images of 800x1344 (N = 201,528 anchors) with M = 100 that would be 1.3 GB per buffer, so the anchors
are processed in chunks of at most ``max_elements // (B * M)`` anchors (default 2**26 elements,
256 MiB per buffer). Besides the chunk buffers the matcher keeps ``B * N`` best IoUs (float32) and
indices (int64) and, for ``allow_low_quality``, a second pass over the chunks.
"""

from __future__ import annotations

import torch

from retinaflow.config import MatcherConfig
from retinaflow.errors import ConfigError, DataError

BACKGROUND = -1
IGNORE = -2
DEFAULT_MAX_ELEMENTS = 2**26


def pairwise_iou(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
    """IoU of each anchor with each ground truth of each image.

    anchors: (N, 4) float x1y1x2y2; gt_boxes: (B, M, 4) float x1y1x2y2; gt_valid: (B, M) bool.
    Returns (B, N, M) float32; invalid (padding) ground truths get -1 so they never win a ``max``.
    Matches torchvision.ops.box_iou per image, without its extra (N, M, 2) temporaries.
    """
    a = anchors.float()[None, :, None, :]  # (1, N, 1, 4)
    g = gt_boxes.float()[:, None, :, :]  # (B, 1, M, 4)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])  # (1, N, 1)
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])  # (B, 1, M)
    inter = torch.minimum(a[..., 2], g[..., 2]).sub_(torch.maximum(a[..., 0], g[..., 0])).clamp_(min=0)
    inter.mul_(torch.minimum(a[..., 3], g[..., 3]).sub_(torch.maximum(a[..., 1], g[..., 1])).clamp_(min=0))
    union = (area_a + area_g).sub_(inter).clamp_(min=torch.finfo(torch.float32).tiny)
    iou = inter.div_(union)
    return iou.masked_fill_(~gt_valid[:, None, :], -1.0)


def match(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    cfg: MatcherConfig,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Assign every anchor of every image.

    anchors:   (N, 4) float x1y1x2y2 in input pixels (the levels concatenated).
    gt_boxes:  (B, M, 4) float x1y1x2y2 in input pixels; rows with label -1 are padding.
    gt_labels: (B, M) int64, class index, -1 for padding (padding never matches).
    Returns (B, N) int64: the index (0..M-1) of the matched ground truth when the anchor's best IoU is
    >= ``cfg.fg_iou``, -1 (background) when it is < ``cfg.bg_iou``, -2 (ignored) in between. With
    ``cfg.allow_low_quality`` every ground truth's best anchors (all ties, IoU > 0) also become foreground,
    matched to their own best ground truth, as torchvision's Matcher does.
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
    batch, num_gt = gt_labels.shape
    num_anchors = anchors.shape[0]
    device = anchors.device
    if num_gt == 0:
        return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.int64, device=device)

    valid = gt_labels >= 0
    chunk = max(1, max_elements // max(1, batch * num_gt))
    best_iou = torch.empty(batch, num_anchors, dtype=torch.float32, device=device)
    best_idx = torch.empty(batch, num_anchors, dtype=torch.int64, device=device)
    best_per_gt = torch.full((batch, num_gt), -1.0, dtype=torch.float32, device=device)
    for start in range(0, num_anchors, chunk):
        iou = pairwise_iou(anchors[start : start + chunk], gt_boxes, valid)  # (B, n, M)
        value, index = iou.max(dim=2)  # best ground truth of each anchor
        best_iou[:, start : start + chunk] = value
        best_idx[:, start : start + chunk] = index
        if cfg.allow_low_quality:
            best_per_gt = torch.maximum(best_per_gt, iou.amax(dim=1))

    matches = torch.where(best_iou >= cfg.fg_iou, best_idx, torch.full_like(best_idx, IGNORE))
    matches = matches.masked_fill_(best_iou < cfg.bg_iou, BACKGROUND)

    if cfg.allow_low_quality:
        # Only real overlaps: a ground truth that touches no anchor must not claim every IoU-0 anchor.
        target = best_per_gt.masked_fill(best_per_gt <= 0, 2.0)[
            :, None, :
        ]  # (B, 1, M); 2 never equals an IoU
        for start in range(0, num_anchors, chunk):
            iou = pairwise_iou(anchors[start : start + chunk], gt_boxes, valid)
            hit = (iou == target).any(dim=2)  # (B, n)
            part = matches[:, start : start + chunk]
            part.copy_(torch.where(hit, best_idx[:, start : start + chunk], part))
    return matches
