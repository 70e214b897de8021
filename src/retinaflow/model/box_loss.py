"""Per-anchor box regression losses: smooth L1 on encoded deltas (paper, ODTK) or GIoU on decoded boxes.

``loss.box_loss`` picks one. GIoU (Rezatofighi et al.) scores the decoded box against its ground truth
directly, so it weighs position and size errors as the IoU-based evaluation does; torchvision's RetinaNet
offers it as ``bbox_reg_loss_type="giou"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retinaflow.config import LossConfig
from retinaflow.errors import ConfigError
from retinaflow.model.box_coder import encode
from retinaflow.ops._reference import decode_deltas

BOX_LOSSES = ("smooth_l1", "giou")


def box_loss_per_anchor(
    deltas: torch.Tensor, anchors: torch.Tensor, matched: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """Unreduced box loss of every anchor.

    deltas: (B, N, 4) float32 predicted deltas; anchors: (N, 4) or (B, N, 4); matched: (B, N, 4) the
    ground-truth box of each anchor (background anchors: any finite box, e.g. the anchor), all x1y1x2y2.
    Returns (B, N) float32; the caller keeps the foreground entries.
    """
    if cfg.box_loss == "smooth_l1":
        target = encode(anchors, matched)
        return F.smooth_l1_loss(deltas, target, beta=cfg.smooth_l1_beta, reduction="none").sum(dim=2)
    if cfg.box_loss == "giou":
        return giou_loss(decode_deltas(anchors.to(deltas.dtype), deltas), matched)
    raise ConfigError(f"loss.box_loss must be one of {', '.join(BOX_LOSSES)}, got {cfg.box_loss!r}")


def giou_loss(boxes: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU of each box with its target, elementwise: (..., 4) x1y1x2y2 twice -> (...).

    Equal to torchvision's ``generalized_box_iou_loss(reduction="none")``, but the intersection is
    clamped at zero instead of filled in through boolean masks: those masks are ``nonzero`` calls, i.e.
    ten host syncs per training step (forward and backward), which kept the CPU from queueing ahead.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    gx1, gy1, gx2, gy2 = target.unbind(-1)
    inter_w = (torch.minimum(x2, gx2) - torch.maximum(x1, gx1)).clamp(min=0)
    inter_h = (torch.minimum(y2, gy2) - torch.maximum(y1, gy1)).clamp(min=0)
    inter = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter
    hull = (torch.maximum(x2, gx2) - torch.minimum(x1, gx1)) * (
        torch.maximum(y2, gy2) - torch.minimum(y1, gy1)
    )
    return 1 - inter / (union + eps) + (hull - union) / (hull + eps)
