"""RetinaNet training loss: sigmoid focal loss + a box loss (box_loss.py), normalised by the foreground count.

The whole batch is matched and scored at once (no per-image loop) in float32, also under autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from retinaflow.config import LossConfig, MatcherConfig
from retinaflow.errors import DataError
from retinaflow.model.box_loss import box_loss_per_anchor
from retinaflow.model.focal import focal_loss_sum
from retinaflow.model.retinanet import flatten_outputs
from retinaflow.ops.matching import IGNORE, match_anchors

Normaliser = float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def detection_loss(
    cls_outputs: Sequence[torch.Tensor] | torch.Tensor,
    box_outputs: Sequence[torch.Tensor] | torch.Tensor,
    anchors: Sequence[torch.Tensor] | torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    loss_cfg: LossConfig,
    matcher_cfg: MatcherConfig,
    num_fg_norm: Normaliser | None = None,
) -> dict[str, torch.Tensor]:
    """Focal + box loss of a batch.

    cls_outputs: per level (B, A*C, H_l, W_l) raw logits, or already flattened (B, N, C).
    box_outputs: per level (B, A*4, H_l, W_l) raw deltas, or already flattened (B, N, 4).
    anchors:     per level (H_l*W_l*A, 4) as from ``generate_anchors``, or concatenated (N, 4); x1y1x2y2.
    gt_boxes:    (B, M, 4) float x1y1x2y2 in input pixels; gt_labels: (B, M) int64 in 0..C-1, -1 = padding.
    num_fg_norm: what to divide both sums by instead of the batch's foreground count: a number or tensor,
                 or a function of the local count (0-dim float32 tensor) returning the normaliser, e.g. one
                 that all-reduces it over DDP ranks and divides by the world size. Clamped to >= 1.
    Returns 0-dim float32 tensors: "cls" (focal loss over all non-ignored anchors and classes), "box"
    (``loss_cfg.box_loss`` of foreground anchors: smooth L1, beta ``loss_cfg.smooth_l1_beta``, on encoded
    deltas, or GIoU on decoded boxes; times ``loss_cfg.box_weight``) and "loss" = cls + box.
    """
    if isinstance(cls_outputs, torch.Tensor) and isinstance(box_outputs, torch.Tensor):
        cls, box = cls_outputs, box_outputs
    else:
        cls, box = flatten_outputs(list(cls_outputs), list(box_outputs))
    flat_anchors = anchors if isinstance(anchors, torch.Tensor) else torch.cat(list(anchors))
    if cls.dim() != 3 or box.dim() != 3 or box.shape[:2] != cls.shape[:2] or box.shape[2] != 4:
        raise DataError(
            "head outputs must flatten to (B, N, C) and (B, N, 4), "
            f"got {tuple(cls.shape)} and {tuple(box.shape)}"
        )
    if flat_anchors.shape != (cls.shape[1], 4):
        raise DataError(
            f"{cls.shape[1]} head outputs per image but anchors are {tuple(flat_anchors.shape)}: "
            "were the anchors generated for this image size and anchor config?"
        )
    if gt_boxes.shape[0] != cls.shape[0]:
        raise DataError(f"{cls.shape[0]} images of outputs but ground truth for {gt_boxes.shape[0]}")

    with torch.autocast(device_type=cls.device.type, enabled=False):
        cls = cls.float()
        box = box.float()
        flat_anchors = flat_anchors.float()
        gt_boxes = gt_boxes.float()

        matches = match_anchors(flat_anchors, gt_boxes, gt_labels, matcher_cfg)  # (B, N)
        foreground = matches >= 0
        gt_index = matches.clamp(min=0)

        # Classification: focal loss over every non-ignored (anchor, class) pair, computed without
        # dense one-hot targets (see focal.py); ignored anchors contribute nothing.
        labels = torch.gather(gt_labels, 1, gt_index).masked_fill(~foreground, -1)  # (B, N)
        cls_sum = focal_loss_sum(cls, labels, matches != IGNORE, loss_cfg.alpha, loss_cfg.gamma)

        # Boxes: background anchors are paired with themselves (zero deltas) so nothing is infinite.
        matched = torch.gather(gt_boxes, 1, gt_index[..., None].expand(-1, -1, 4))  # (B, N, 4)
        matched = torch.where(foreground[..., None], matched, flat_anchors[None])
        per_anchor = box_loss_per_anchor(box, flat_anchors[None], matched, loss_cfg)  # (B, N)
        box_sum = torch.where(foreground, per_anchor, 0.0).sum()

        norm = _normaliser(foreground.sum().to(torch.float32), num_fg_norm)
        cls_loss = cls_sum / norm
        box_loss = box_sum / norm * loss_cfg.box_weight
    return {"cls": cls_loss, "box": box_loss, "loss": cls_loss + box_loss}


def _normaliser(num_fg: torch.Tensor, override: Normaliser | None) -> torch.Tensor:
    """max(1, override or the foreground count) as a 0-dim float32 tensor on num_fg's device."""
    if override is None:
        value = num_fg
    elif callable(override):
        value = override(num_fg)
    else:
        value = torch.as_tensor(override)
    return value.to(device=num_fg.device, dtype=torch.float32).clamp(min=1.0)
