"""Pure-PyTorch reference of the ``retinaflow::`` operators; runs on CPU and CUDA tensors.

``decode``, ``nms`` and ``match`` are the operators' CPU implementations (registered by :mod:`._library`)
and define the semantics that the CUDA kernels (``kernels/``) reproduce:

decode — per image and per FPN level: sigmoid of the class logits, keep (anchor, class) pairs whose
score is above ``score_thresh``, take the ``top_n`` best of them, decode their anchor's box deltas
(torchvision ``BoxCoder``, weights 1, dw/dh clamped at log(1000/16)) and clamp the box to the image.
Ranking is by logit (the sigmoid is monotone) with ties broken by the lower flat index
``((y * W + x) * A + a) * C + c``, so the result is deterministic and identical to the kernels'.
Candidates of level ``l`` fill slots ``[l * top_n, (l + 1) * top_n)`` in descending order; unused slots
are padding: score 0, box 0, class -1 (real candidates always have score > ``score_thresh`` >= 0).

nms — batched, class-aware greedy NMS (torchvision ``batched_nms``) over the rows of each image whose
class is >= 0 (padding rows, class -1, are ignored), keeping at most ``max_det`` rows.

match — RetinaNet's anchor assignment (see :func:`match`): the IoU of every anchor with every ground truth
of its image, best ground truth per anchor (first index among ties), fg/bg thresholds, optional
low-quality matches. The kernel reproduces each float32 rounding of :func:`pairwise_iou`.

colour_jitter — torchvision's brightness, contrast and saturation adjustments on a padded uint8 batch,
each image with its own factors and its own pixels (see :func:`colour_jitter`).
"""

from __future__ import annotations

import math

import torch
import torchvision

# dw, dh clamp before ``exp``; kernels/decode.cu has it as kClip (tests/ops/test_ext.py checks they agree).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
_LOW32 = (1 << 32) - 1


def flatten_level(x: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """(B, A*K, H, W) head output -> (B, H*W*A, K): location-major (y, then x), anchor-minor."""
    batch, channels, height, width = x.shape
    k = channels // num_anchors
    return x.reshape(batch, num_anchors, k, height, width).permute(0, 3, 4, 1, 2).reshape(batch, -1, k)


def decode_deltas(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Boxes from anchors and deltas (torchvision convention, weights 1, dw/dh clamped at log(1000/16)).

    anchors: (..., 4) float x1y1x2y2; deltas: (..., 4) (dx, dy, dw, dh), same shape.
    Returns (..., 4) float x1y1x2y2.
    """
    widths = anchors[..., 2] - anchors[..., 0]
    heights = anchors[..., 3] - anchors[..., 1]
    ctr_x = anchors[..., 0] + 0.5 * widths
    ctr_y = anchors[..., 1] + 0.5 * heights
    dx, dy, dw, dh = deltas.unbind(-1)
    pred_x = dx * widths + ctr_x
    pred_y = dy * heights + ctr_y
    pred_w = torch.exp(dw.clamp(max=BBOX_XFORM_CLIP)) * widths
    pred_h = torch.exp(dh.clamp(max=BBOX_XFORM_CLIP)) * heights
    return torch.stack(
        [pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h, pred_x + 0.5 * pred_w, pred_y + 0.5 * pred_h], dim=-1
    )


def rank_keys(logits: torch.Tensor) -> torch.Tensor:
    """Unique int64 ranking keys: larger logit first, then lower flat index (the kernels' order).

    logits: (B, N) float32. Returns (B, N) int64 = ordered_bits(logit) * 2^32 + (2^32 - 1 - index).
    """
    bits = logits.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    index = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int64)
    return ordered * (1 << 32) + (_LOW32 - index)


def decode(
    cls_heads: list[torch.Tensor],
    box_heads: list[torch.Tensor],
    anchors: list[torch.Tensor],
    sizes: torch.Tensor,
    score_thresh: float,
    top_n: int,
    capacity: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top candidates of every level, decoded and clamped; fixed-size, no host synchronisation.

    cls_heads: per level (B, A*C, H_l, W_l) logits; box_heads: per level (B, A*4, H_l, W_l) deltas;
    anchors: per level (H_l*W_l*A, 4) float x1y1x2y2 in input pixels; sizes: (B, 2) (height, width) of
    each unpadded image (boxes are clamped to it).
    Returns scores (B, K) float32, boxes (B, K, 4) float32, classes (B, K) int64 with K = levels * top_n.
    ``capacity`` tunes only the kernels' fast path (0: their default); the result does not depend on it.
    """
    batch = cls_heads[0].shape[0]
    device = cls_heads[0].device
    hw = sizes.to(device=device, dtype=torch.float32)
    upper = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)[:, None, :]
    scores_out, boxes_out, classes_out = [], [], []
    for cls, box, anc in zip(cls_heads, box_heads, anchors, strict=True):
        _, _, height, width = cls.shape
        num_anchors = anc.shape[0] // (height * width)
        num_classes = cls.shape[1] // num_anchors
        logits = flatten_level(cls, num_anchors).reshape(batch, -1).float()
        deltas = flatten_level(box, num_anchors).float()
        scores = torch.sigmoid(logits)
        present = scores > score_thresh
        keys = torch.where(present, rank_keys(logits), torch.iinfo(torch.int64).min)
        k = min(top_n, logits.shape[1])
        _, idx = keys.topk(k, dim=1)  # sorted descending
        valid = present.gather(1, idx)
        anchor_idx = idx // num_classes
        picked = decode_deltas(
            anc.to(device=device, dtype=torch.float32)[anchor_idx],
            deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4)),
        )
        picked = torch.minimum(picked.clamp(min=0), upper)
        s = torch.where(valid, scores.gather(1, idx), 0.0)
        b = torch.where(valid[..., None], picked, 0.0)
        c = torch.where(valid, idx % num_classes, -1)
        if k < top_n:
            pad = top_n - k
            s = torch.cat([s, s.new_zeros(batch, pad)], dim=1)
            b = torch.cat([b, b.new_zeros(batch, pad, 4)], dim=1)
            c = torch.cat([c, c.new_full((batch, pad), -1)], dim=1)
        scores_out.append(s)
        boxes_out.append(b)
        classes_out.append(c)
    return torch.cat(scores_out, dim=1), torch.cat(boxes_out, dim=1), torch.cat(classes_out, dim=1)


def nms(
    scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, iou_threshold: float, max_det: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-aware greedy NMS per image (torchvision ``batched_nms``), padded to ``max_det`` rows.

    scores: (B, K) float; boxes: (B, K, 4) float x1y1x2y2; classes: (B, K) int, rows with class < 0 or a
    NaN score are ignored. Returns the fields of a :class:`~retinaflow.ops.detections.Detections`
    (B, max_det): scores (B, D) and boxes (B, D, 4) float32, classes (B, D) and counts (B,) int64.
    Loops over images and synchronises with the host (the kept count is data-dependent).
    """
    batch = scores.shape[0]
    device = scores.device
    out_scores = torch.zeros(batch, max_det, dtype=torch.float32, device=device)
    out_boxes = torch.zeros(batch, max_det, 4, dtype=torch.float32, device=device)
    out_classes = torch.full((batch, max_det), -1, dtype=torch.int64, device=device)
    counts = torch.zeros(batch, dtype=torch.int64, device=device)
    for i in range(batch):
        s, b, c = scores[i].float(), boxes[i].float(), classes[i].long()
        valid = (c >= 0) & ~torch.isnan(s)
        s, b, c = s[valid], b[valid], c[valid]
        keep = torchvision.ops.batched_nms(b, s, c, iou_threshold)[:max_det]
        n = keep.numel()
        out_scores[i, :n] = s[keep]
        out_boxes[i, :n] = b[keep]
        out_classes[i, :n] = c[keep]
        counts[i] = n
    return out_scores, out_boxes, out_classes, counts


BACKGROUND = -1
IGNORE = -2
DEFAULT_MAX_ELEMENTS = 2**26


def pairwise_iou(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
    """IoU of each anchor with each ground truth of each image.

    anchors: (N, 4) float x1y1x2y2; gt_boxes: (B, M, 4) float x1y1x2y2; gt_valid: (B, M) bool.
    Returns (B, N, M) float32 ``inter / max(area_a + area_g - inter, tiny)``; invalid (padding) ground
    truths get -1 so they never win a ``max``. Matches torchvision.ops.box_iou per image, without its
    extra (N, M, 2) temporaries.
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
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Assign every anchor of every image (shapes and result as ``retinaflow.ops.matching.match_anchors``).

    Memory: the IoU of every anchor with every ground truth is ``B * N * M`` float32 values; computing
    it needs about three such buffers at once, so anchors are processed in chunks of at most
    ``max_elements // (B * M)`` (default 2**26 elements, 256 MiB per buffer). Besides the chunk buffers
    it keeps ``B * N`` best IoUs and indices and, for ``allow_low_quality``, makes a second pass.
    """
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
        if allow_low_quality:
            best_per_gt = torch.maximum(best_per_gt, iou.amax(dim=1))

    matches = torch.where(best_iou >= fg_iou, best_idx, torch.full_like(best_idx, IGNORE))
    matches = matches.masked_fill_(best_iou < bg_iou, BACKGROUND)

    if allow_low_quality:
        # Only real overlaps: a ground truth that touches no anchor must not claim every IoU-0 anchor.
        # (B, 1, M) targets; 2 never equals an IoU.
        target = best_per_gt.masked_fill(best_per_gt <= 0, 2.0)[:, None, :]
        for start in range(0, num_anchors, chunk):
            iou = pairwise_iou(anchors[start : start + chunk], gt_boxes, valid)
            hit = (iou == target).any(dim=2)  # (B, n)
            part = matches[:, start : start + chunk]
            part.copy_(torch.where(hit, best_idx[:, start : start + chunk], part))
    return matches


def norm_acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the GroupNorm statistics: float32, float64 for a float64 input."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, G) -> (B, C, 1, 1): each group's value repeated over its channels."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)[..., None, None]


def _group_mean(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, G): the mean of each group's channels and pixels."""
    b, c, h, w = t.shape
    return t.sum((2, 3)).view(b, groups, -1).sum(-1) / ((c // groups) * h * w)


def group_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm with its statistics: x (B, C, H, W) -> (y like x, mean (B, G), rstd (B, G)).

    y = (x - mean) * rstd * weight + bias, computed in float32 (float64 for float64 x) and rounded once to
    x's dtype; the variance is E[x^2] - E[x]^2 of float32 sums (clamped at 0), as the kernel computes it.
    """
    c = x.shape[1]
    xf = x.to(norm_acc_dtype(x))
    mean = _group_mean(xf, groups)
    rstd = ((_group_mean(xf.square(), groups) - mean.square()).clamp_min(0.0) + eps).rsqrt()
    y = (xf - _per_channel(mean, c)) * _per_channel(rstd, c)
    if weight is not None:
        y = y * weight.to(xf.dtype)[:, None, None]
    if bias is not None:
        y = y + bias.to(xf.dtype)[:, None, None]
    return y.to(x.dtype), mean, rstd


def group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`group_norm`: (dx like x, dweight (C,), dbias (C,)) in the statistics' float type.

    dx = rstd * (w dy - mean_g(w dy) - xhat * mean_g(w dy xhat)), means over each group's channels and
    pixels; dweight = sum of dy * xhat, dbias = sum of dy over images and pixels.
    """
    c, acc = x.shape[1], norm_acc_dtype(x)
    xhat = (x.to(acc) - _per_channel(mean, c)) * _per_channel(rstd, c)
    g = dy.to(acc)
    wdy = g * weight.to(acc)[:, None, None] if weight is not None else g
    m1, m2 = _group_mean(wdy, groups), _group_mean(wdy * xhat, groups)
    dx = _per_channel(rstd, c) * (wdy - _per_channel(m1, c) - xhat * _per_channel(m2, c))
    return dx.to(x.dtype), (g * xhat).sum((0, 2, 3)), g.sum((0, 2, 3))


def colour_jitter(images: torch.Tensor, sizes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` → ``adjust_contrast`` → ``adjust_saturation`` on a padded batch.

    images:  (B, 3, H, W) uint8 RGB, each image in its top-left ``sizes[i]`` corner, zeros elsewhere;
    sizes:   (B, 2) int (h, w) of each image;
    factors: (B, 3) float (brightness, contrast, saturation) per image.
    Returns (B, 3, H, W) uint8 channels_last with the padding still zero. Same arithmetic as torchvision
    on each image alone (float32, truncation to uint8 after each step, the contrast's mean over the
    image's own pixels). The CUDA kernel (``kernels/colour.cu``) sums the grey levels exactly, where this
    float32 sum may round: its mean can differ in the last bits.
    """
    sizes = sizes.to(images.device)  # the loaders keep sizes on the host
    valid = _valid_mask(images, sizes)  # (B, 1, H, W) bool
    area = (sizes[:, 0] * sizes[:, 1]).to(torch.float32).clamp(min=1).view(-1, 1, 1, 1)
    f = factors.to(device=images.device, dtype=torch.float32).view(-1, 3, 1, 1)
    x = images.float()
    x = (x * f[:, 0:1]).clamp_(0, 255).floor_()
    mean = _grey(x).sum(dim=(-2, -1), keepdim=True) / area
    x = (x * f[:, 1:2] + mean * (1 - f[:, 1:2])).clamp_(0, 255).floor_() * valid
    x = (x * f[:, 2:3] + _grey(x) * (1 - f[:, 2:3])).clamp_(0, 255).floor_()
    return x.to(torch.uint8).contiguous(memory_format=torch.channels_last)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float 0..255 → (B, 1, H, W) grey levels, floored (torchvision's uint8 grayscale)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor_()


def _valid_mask(images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: True inside each image's own (h, w) corner."""
    h, w = images.shape[-2:]
    sizes = sizes.to(images.device)
    rows = torch.arange(h, device=images.device).view(1, 1, h, 1) < sizes[:, 0].view(-1, 1, 1, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, 1, w) < sizes[:, 1].view(-1, 1, 1, 1)
    return rows & cols
