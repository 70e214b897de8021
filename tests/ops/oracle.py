"""Independent, deliberately plain implementations the ops are checked against (CPU, float32).

- ``loop_decode``: torchvision ``RetinaNet.postprocess_detections``'s per-image, per-level steps.
- ``greedy_nms``: textbook greedy class-aware NMS with the documented tie order (higher score first,
  then lower row), IoU computed in float32 exactly as torchvision's CPU kernel does.
- random head outputs whose logits sit on a 1/64 grid, so scores tie often but no logit is within
  rounding of the threshold (``GRID_THRESH``), which makes exact comparisons meaningful.
"""

from __future__ import annotations

import math

import torch

CLIP = math.log(1000.0 / 16)
GRID = 64.0
# sigmoid(-2 + 1/128): halfway between two grid logits, far from rounding of any of them.
GRID_THRESH = 1.0 / (1.0 + math.exp(2.0 - 1.0 / (2 * GRID)))


def random_heads(
    batch: int,
    shapes: list[tuple[int, int]],
    num_anchors: int,
    num_classes: int,
    seed: int,
    stride0: int = 8,
    dtype: torch.dtype = torch.float32,
    mean: float = -3.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Class/box heads (grid logits around ``mean``) and matching anchors for levels of ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    cls, box, anchors = [], [], []
    for level, (h, w) in enumerate(shapes):
        stride = stride0 * 2**level
        normal = torch.randn(batch, num_anchors * num_classes, h, w, generator=g)
        logits = torch.round((normal + mean) * GRID) / GRID
        cls.append(logits.to(dtype))
        box.append((torch.randn(batch, num_anchors * 4, h, w, generator=g) * 0.5).to(dtype))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ctr = torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], -1).reshape(-1, 1, 2).float()
        half = torch.rand(1, num_anchors, 2, generator=g) * 2 * stride + stride / 2
        anchors.append(torch.cat([ctr - half, ctr + half], -1).reshape(-1, 4))
    return cls, box, anchors


def loop_decode(
    cls: list[torch.Tensor],
    box: list[torch.Tensor],
    anchors: list[torch.Tensor],
    sizes: torch.Tensor,
    thresh: float,
    top_n: int,
) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per image, per level: (scores (k,), boxes (k, 4), classes (k,)) like torchvision's loop."""
    out = []
    for i in range(cls[0].shape[0]):
        levels = []
        for c, b, a in zip(cls, box, anchors, strict=True):
            _, _, h, w = c.shape
            num_anchors = a.shape[0] // (h * w)
            num_classes = c.shape[1] // num_anchors
            logits = c[i].float().view(num_anchors, num_classes, h, w).permute(2, 3, 0, 1).reshape(-1)
            deltas = b[i].float().view(num_anchors, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
            scores = torch.sigmoid(logits)
            idx = torch.where(scores > thresh)[0]
            scores = scores[idx]
            scores, order = scores.topk(min(top_n, idx.numel()))
            idx = idx[order]
            anc, d = a[idx // num_classes], deltas[idx // num_classes]
            aw, ah = anc[:, 2] - anc[:, 0], anc[:, 3] - anc[:, 1]
            cx, cy = anc[:, 0] + 0.5 * aw, anc[:, 1] + 0.5 * ah
            px, py = d[:, 0] * aw + cx, d[:, 1] * ah + cy
            pw, ph = torch.exp(d[:, 2].clamp(max=CLIP)) * aw, torch.exp(d[:, 3].clamp(max=CLIP)) * ah
            boxes = torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], -1)
            height, width = float(sizes[i, 0]), float(sizes[i, 1])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            levels.append((scores, boxes, idx % num_classes))
        out.append(levels)
    return out


def iou_row(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one (4,) box with (N, 4) boxes, float32, torchvision CPU formula and operation order."""
    xx1, yy1 = torch.maximum(box[0], boxes[:, 0]), torch.maximum(box[1], boxes[:, 1])
    xx2, yy2 = torch.minimum(box[2], boxes[:, 2]), torch.minimum(box[3], boxes[:, 3])
    inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def greedy_nms(
    scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, iou: float, max_det: int
) -> torch.Tensor:
    """Kept row indices of one image, best first. scores (K,), boxes (K, 4), classes (K,)."""
    s, b, c = scores.float().cpu(), boxes.float().cpu(), classes.long().cpu()
    valid = torch.where((c >= 0) & ~torch.isnan(s))[0]
    order = valid[torch.sort(s[valid], descending=True, stable=True).indices]
    alive = torch.ones(order.numel(), dtype=torch.bool)
    kept: list[int] = []
    for pos in range(order.numel()):
        if not alive[pos]:
            continue
        i = int(order[pos])
        kept.append(i)
        if len(kept) == max_det:
            break
        rest = order[pos + 1 :]
        suppress = (c[rest] == c[i]) & (iou_row(b[i], b[rest]) > iou)
        alive[pos + 1 :] &= ~suppress
    return torch.tensor(kept, dtype=torch.int64)
