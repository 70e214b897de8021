"""Box -> delta encoding (the loss's regression targets), torchvision ``BoxCoder`` convention.

For an anchor of centre (xa, ya) and size (wa, ha) (width = x2 - x1, no +1) and a box (x, y, w, h):
``dx = (x - xa) / wa, dy = (y - ya) / ha, dw = log(w / wa), dh = log(h / ha)``, each multiplied by its
weight. The inverse, with weights 1, is :func:`retinaflow.ops._reference.decode_deltas` (what the decode
op and its kernel apply).
"""

from __future__ import annotations

import torch

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
