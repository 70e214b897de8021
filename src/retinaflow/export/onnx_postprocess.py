"""Decode + NMS written with ops that export to standard ONNX (TopK, Gather, NonMaxSuppression, ...).

The semantics are those of :mod:`retinaflow.ops._reference` (per-level top ``top_n`` above
``score_thresh``, torchvision box decoding clamped to each image, class-aware NMS with IoU >
``nms_iou`` suppressed, ``max_det`` best kept), with one difference: candidates of equal logit are
ranked in TopK's order rather than by anchor index (ties are rare in float32 and change no score).
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision

from retinaflow.config import InferConfig
from retinaflow.ops._reference import decode_deltas, flatten_level


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression``: eager forward for tracing, ``symbolic`` for the exporter."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, max_out: int, iou_threshold: float, score: float
    ) -> torch.Tensor:
        """boxes (B, K, 4) x1y1x2y2; scores (B, C, K). Returns (S, 3) int64 [batch, class, box]."""
        rows = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                idx = torch.nonzero(scores[b, c] > score).flatten()
                keep = idx[torchvision.ops.nms(boxes[b, idx], scores[b, c, idx], iou_threshold)[:max_out]]
                rows.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1))
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_out: int, iou_threshold: float, score: float) -> Any:
        const = lambda v, dt: g.op("Constant", value_t=torch.tensor([v], dtype=dt))  # noqa: E731
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            const(max_out, torch.int64),
            const(iou_threshold, torch.float32),
            const(score, torch.float32),
            center_point_box_i=0,
        )


class OnnxPostprocess(torch.nn.Module):
    """Raw head maps -> fixed-size detections, exportable to ONNX with a dynamic batch.

    anchors: per level (H_l*W_l*A, 4) float x1y1x2y2 for the engine's fixed input size.
    forward(cls: per level (B, A*C, H_l, W_l), box: per level (B, A*4, H_l, W_l), sizes: (B, 2) int64)
    -> num_detections (B,) int64, boxes (B, D, 4) float32 x1y1x2y2, scores (B, D) float32,
    classes (B, D) int64 (-1 on padding rows), D = ``cfg.max_det``.
    """

    def __init__(self, anchors: list[torch.Tensor], num_classes: int, cfg: InferConfig) -> None:
        super().__init__()
        self.num_classes, self.cfg = num_classes, cfg
        self.levels = len(anchors)
        for i, a in enumerate(anchors):
            self.register_buffer(f"anchors{i}", a.float(), persistent=False)

    def forward(
        self, cls: list[torch.Tensor], box: list[torch.Tensor], sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hw = sizes.float()
        upper = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)[:, None, :]  # (B, 1, 4)
        parts = [self._level(cls[i], box[i], getattr(self, f"anchors{i}"), upper) for i in range(self.levels)]
        scores, boxes, classes = (torch.cat(t, dim=1) for t in zip(*parts, strict=True))
        return self._nms(scores, boxes, classes)

    def _level(
        self, cls: torch.Tensor, box: torch.Tensor, anchors: torch.Tensor, upper: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top candidates of one level: scores (B, k), boxes (B, k, 4), classes (B, k); padding 0/0/-1."""
        num_anchors = box.shape[1] // 4
        logits = flatten_level(cls, num_anchors).flatten(1).float()  # (B, N*C)
        deltas = flatten_level(box, num_anchors).float()  # (B, N, 4)
        k = min(self.cfg.top_n, anchors.shape[0] * self.num_classes)
        top, idx = logits.topk(k, dim=1)
        scores = torch.sigmoid(top)
        valid = scores > self.cfg.score_thresh
        anchor_idx = torch.div(idx, self.num_classes, rounding_mode="floor")
        picked = decode_deltas(anchors[anchor_idx], deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4)))
        picked = torch.minimum(picked.clamp(min=0), upper)
        return (
            torch.where(valid, scores, torch.zeros_like(scores)),
            torch.where(valid[..., None], picked, torch.zeros_like(picked)),
            torch.where(valid, idx % self.num_classes, torch.full_like(idx, -1)),
        )

    def _nms(
        self, scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class-aware NMS over (B, K) candidates; the ``max_det`` best survivors, best first."""
        labels = torch.arange(self.num_classes, dtype=classes.dtype, device=classes.device)[None, :, None]
        per_class = scores[:, None, :] * (classes[:, None, :] == labels).to(scores.dtype)  # (B, C, K)
        max_det = self.cfg.max_det
        selected = _NonMaxSuppression.apply(boxes, per_class, max_det, self.cfg.nms_iou, 0.0)
        b, k = selected[:, 0], selected[:, 2]
        kept = torch.zeros_like(scores).index_put((b, k), scores[b, k])  # (B, K): survivors' scores
        d = min(max_det, scores.shape[1])
        top, idx = kept.topk(d, dim=1)
        valid = top > 0
        out_boxes = torch.where(valid[..., None], boxes.gather(1, idx[..., None].expand(-1, -1, 4)), 0.0)
        out_classes = torch.where(valid, classes.gather(1, idx), torch.full_like(idx, -1))
        if d < max_det:  # fewer candidates than detection slots: pad to the fixed size
            pad = top.new_zeros(top.shape[0], max_det - d)
            top, valid = torch.cat([top, pad], 1), torch.cat([valid, pad > 0], 1)
            out_boxes = torch.cat([out_boxes, pad[..., None].expand(-1, -1, 4)], 1)
            out_classes = torch.cat([out_classes, pad.long() - 1], 1)
        return valid.sum(1), out_boxes, top, out_classes
