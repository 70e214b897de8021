"""Post-processing ops: decode, NMS and both chained; each one ``torch.ops.retinaflow`` call.

The dispatcher picks the implementation by the tensors' device: the CUDA kernels (``kernels/``, loaded by
:mod:`retinaflow.ops._ext` on the first CUDA tensor) or, on the CPU, the pure-PyTorch reference
(:mod:`retinaflow.ops._reference`), which defines the semantics (padding, tie order) both share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from retinaflow.config import InferConfig
from retinaflow.errors import ConfigError
from retinaflow.ops import _ext
from retinaflow.ops._library import MAX_LEVELS, MAX_TOP_N
from retinaflow.ops.detections import Detections

__all__ = ["Detections", "batched_nms", "decode_detections", "postprocess"]


def _check_decode(
    cls_heads: Sequence[torch.Tensor],
    box_heads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    sizes: torch.Tensor,
    score_thresh: float,
    top_n: int,
) -> None:
    levels = len(cls_heads)
    if levels == 0 or levels > MAX_LEVELS:
        raise ConfigError(f"decode needs 1..{MAX_LEVELS} pyramid levels, got {levels}")
    if len(box_heads) != levels or len(anchors) != levels:
        raise ConfigError(
            f"decode needs as many box heads and anchor sets as class heads ({levels}), "
            f"got {len(box_heads)} and {len(anchors)}"
        )
    if not 0.0 <= score_thresh < 1.0:
        raise ConfigError(f"score_thresh must be in [0, 1), got {score_thresh}")
    if not 1 <= top_n <= MAX_TOP_N:
        raise ConfigError(f"top_n must be in 1..{MAX_TOP_N}, got {top_n}")
    batch = cls_heads[0].shape[0]
    if sizes.shape != (batch, 2):
        raise ConfigError(f"sizes must be (B, 2) = ({batch}, 2) (height, width), got {tuple(sizes.shape)}")
    num_classes = None
    for level, (cls, box, anc) in enumerate(zip(cls_heads, box_heads, anchors, strict=True)):
        if cls.dim() != 4 or box.dim() != 4 or cls.shape[0] != batch:
            raise ConfigError(f"level {level}: heads must be (B, A*C, H, W) with B = {batch}")
        height, width = cls.shape[-2:]
        if box.shape[0] != batch or box.shape[-2:] != (height, width) or box.shape[1] % 4:
            raise ConfigError(
                f"level {level}: box head {tuple(box.shape)} does not match class head {tuple(cls.shape)}"
            )
        num_anchors = box.shape[1] // 4
        if anc.shape != (height * width * num_anchors, 4):
            raise ConfigError(
                f"level {level}: anchors must be (H*W*A, 4) = ({height * width * num_anchors}, 4), "
                f"got {tuple(anc.shape)}"
            )
        if num_anchors == 0 or cls.shape[1] % num_anchors:
            raise ConfigError(
                f"level {level}: class channels {cls.shape[1]} are not a multiple of A = {num_anchors}"
            )
        c = cls.shape[1] // num_anchors
        if num_classes is not None and c != num_classes:
            raise ConfigError(f"level {level}: {c} classes, level 0 has {num_classes}")
        num_classes = c
        if cls.device != cls_heads[0].device or box.device != cls.device:
            raise ConfigError(f"level {level}: heads are on different devices")


def decode_detections(
    cls_heads: Sequence[torch.Tensor],
    box_heads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    sizes: torch.Tensor,
    score_thresh: float,
    top_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``top_n`` candidates per image and level, decoded and clamped to the image.

    cls_heads: per level (B, A*C, H_l, W_l) logits (float32/16, bfloat16; any strides, channels_last
    included); box_heads: per level (B, A*4, H_l, W_l) deltas; anchors: per level (H_l*W_l*A, 4) float
    x1y1x2y2 in input pixels; sizes: (B, 2) int (height, width) of each unpadded resized image.
    Returns scores (B, K) float32, boxes (B, K, 4) float32 x1y1x2y2, classes (B, K) int64, with
    K = levels * top_n; level l fills slots [l*top_n, (l+1)*top_n), best first. Padding slots have
    score 0, box 0 and class -1.
    """
    _check_decode(cls_heads, box_heads, anchors, sizes, score_thresh, top_n)
    _ext.ensure_loaded_for(cls_heads[0])
    # capacity 0: the kernels' default fast-path size (kernels/decode.h)
    return torch.ops.retinaflow.decode(
        list(cls_heads), list(box_heads), list(anchors), sizes, float(score_thresh), int(top_n), 0
    )


def batched_nms(
    scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, iou_threshold: float, max_det: int
) -> Detections:
    """Batched class-aware NMS with fixed-size output.

    scores: (B, K) float; boxes: (B, K, 4) float x1y1x2y2; classes: (B, K) int, class < 0 marks padding
    rows (ignored, as are NaN scores). A box is suppressed by a kept box of the same class and higher
    score (ties: lower row first) when their IoU is > ``iou_threshold``.
    Returns Detections with D = ``max_det`` rows per image. ``iou_threshold`` in [0, 1] and ``max_det`` >= 1
    are checked once, where they are set (``InferConfig``: ``infer.nms_iou``, ``infer.max_det``); the CUDA
    kernel refuses other values too (its C API is also the TensorRT plugin's).
    """
    if scores.dim() != 2 or boxes.shape != (*scores.shape, 4) or classes.shape != scores.shape:
        raise ConfigError(
            f"nms needs scores (B, K), boxes (B, K, 4), classes (B, K); got {tuple(scores.shape)}, "
            f"{tuple(boxes.shape)}, {tuple(classes.shape)}"
        )
    _ext.ensure_loaded_for(scores)
    return Detections(*torch.ops.retinaflow.nms(scores, boxes, classes, float(iou_threshold), int(max_det)))


def postprocess(
    cls_heads: Sequence[torch.Tensor],
    box_heads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    sizes: torch.Tensor,
    cfg: InferConfig,
) -> Detections:
    """decode (``cfg.score_thresh``, ``cfg.top_n``) then NMS (``cfg.nms_iou``, ``cfg.max_det``).

    Inputs as in :func:`decode_detections`; returns Detections (B, cfg.max_det) in resized-image pixels.
    On CUDA with the kernels there is no host synchronisation (CUDA-graph capturable).
    """
    scores, boxes, classes = decode_detections(
        cls_heads, box_heads, anchors, sizes, cfg.score_thresh, cfg.top_n
    )
    return batched_nms(scores, boxes, classes, cfg.nms_iou, cfg.max_det)
