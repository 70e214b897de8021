"""Per-anchor box regression losses: smooth L1 on encoded deltas (paper, ODTK) or GIoU on decoded boxes.

``loss.box_loss`` picks one. GIoU (Rezatofighi et al.) scores the decoded box against its ground truth
directly, so it weighs position and size errors as the IoU-based evaluation does; torchvision's RetinaNet
offers it as ``bbox_reg_loss_type="giou"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

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
        boxes = decode_deltas(anchors.to(deltas.dtype), deltas)
        return generalized_box_iou_loss(boxes, matched, reduction="none")
    raise ConfigError(f"loss.box_loss must be one of {', '.join(BOX_LOSSES)}, got {cfg.box_loss!r}")
