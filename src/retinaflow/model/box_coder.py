"""Box <-> delta encoding, torchvision ``BoxCoder`` convention with weights (1, 1, 1, 1).

For an anchor of centre (xa, ya) and size (wa, ha) (width = x2 - x1, no +1) and a box (x, y, w, h):
``dx = (x - xa) / wa, dy = (y - ya) / ha, dw = log(w / wa), dh = log(h / ha)``, each multiplied by its
weight. Decoding divides by the weights and clamps dw, dh at log(1000 / 16) before ``exp``.
"""

from __future__ import annotations

import math

import torch

BBOX_XFORM_CLIP = math.log(1000.0 / 16)
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(
    anchors: torch.Tensor, gt: torch.Tensor, weights: tuple[float, float, float, float] = DEFAULT_WEIGHTS
) -> torch.Tensor:
    """Deltas that turn ``anchors`` into ``gt``.

    anchors, gt: (..., 4) float x1y1x2y2, broadcastable against each other; boxes must have positive size.
    Returns (..., 4) deltas (dx, dy, dw, dh) in the promoted dtype.
    """
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centre_size(anchors)
    gx, gy, gw, gh = _centre_size(gt)
    return torch.stack(
        [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=-1
    )


def decode(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    weights: tuple[float, float, float, float] = DEFAULT_WEIGHTS,
    clip: float = BBOX_XFORM_CLIP,
) -> torch.Tensor:
    """Boxes obtained by applying ``deltas`` to ``anchors`` (inverse of :func:`encode`).

    anchors: (..., 4) float x1y1x2y2; deltas: (..., 4) (dx, dy, dw, dh), broadcastable against anchors.
    dw, dh are clamped at ``clip`` (log(1000/16)) so ``exp`` cannot overflow.
    Returns (..., 4) float x1y1x2y2 in the anchors' pixel frame, in the deltas' dtype.
    """
    wx, wy, ww, wh = weights
    anchors = anchors.to(deltas.dtype)
    ax, ay, aw, ah = _centre_size(anchors)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=clip)
    dh = (deltas[..., 3] / wh).clamp(max=clip)
    cx = dx * aw + ax
    cy = dy * ah + ay
    half_w = 0.5 * torch.exp(dw) * aw
    half_h = 0.5 * torch.exp(dh) * ah
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
