"""Anchor matching: the CUDA ``match`` kernel vs the chunked PyTorch reference, same process, same inputs.

R50-FPN anchors for 800x1344 (201,600), B images with M ground truths each (some padding), the
default thresholds (0.5 / 0.4), with and without low-quality matches. Both give identical assignments
(checked each run). Also times the whole detection loss (matching + focal + smooth L1, forward and
backward) with each, at batch 8 with 80 classes: what a training step saves.

    python benchmarks/bench_match.py
"""

from __future__ import annotations

from unittest import mock

import torch
from common import emit
from triton.testing import do_bench

from retinaflow.config import Config
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.loss import detection_loss
from retinaflow.ops import _ext, _reference

H, W = 800, 1344


def ground_truth(batch: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, m, 2, generator=g) * torch.tensor([W * 0.8, H * 0.8])
    wh = 8 + torch.rand(batch, m, 2, generator=g) * torch.tensor([W * 0.3, H * 0.3])
    labels = torch.randint(0, 80, (batch, m), generator=g)
    labels[:, m - m // 5 :] = -1  # the last fifth is padding, as in a batch of uneven images
    return torch.cat([xy, xy + wh], -1).cuda(), labels.cuda()


def bench(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=100, return_mode="median"))


def reference_match_anchors(anchors, gt_boxes, gt_labels, cfg):
    return _reference.match(anchors, gt_boxes, gt_labels, cfg.fg_iou, cfg.bg_iou, cfg.allow_low_quality)


def loss_ms(anchors, boxes, labels, reference: bool) -> float:
    """Detection loss forward + backward on random head outputs, matched by the kernel or the reference."""
    cfg = Config()
    sizes = [(-(-H // s), -(-W // s)) for s in (8, 16, 32, 64, 128)]
    batch = boxes.shape[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    cls = [torch.randn(batch, 9 * 80, h, w, device="cuda", generator=g).requires_grad_() for h, w in sizes]
    box = [torch.randn(batch, 9 * 4, h, w, device="cuda", generator=g).requires_grad_() for h, w in sizes]

    def step():
        losses = detection_loss(cls, box, anchors, boxes, labels, cfg.loss, cfg.matcher)
        losses["loss"].backward()

    if not reference:
        return bench(step)
    with mock.patch("retinaflow.model.loss.match_anchors", reference_match_anchors):
        return bench(step)


def main() -> None:
    _ext.load()
    anchors_levels = generate_anchors(Config().model.anchors, (H, W), "cuda", torch.float32)
    anchors = torch.cat(anchors_levels)
    out: dict[str, object] = {"anchors": int(anchors.shape[0]), "size": [H, W]}
    for batch, m in ((8, 12), (8, 100), (16, 100)):
        boxes, labels = ground_truth(batch, m)
        for low in (False, True):
            key = f"b{batch}_m{m}" + ("_lowq" if low else "")
            got = torch.ops.retinaflow.match(anchors, boxes, labels, 0.5, 0.4, low)
            assert torch.equal(got, _reference.match(anchors, boxes, labels, 0.5, 0.4, low)), key
            ref = bench(lambda b=boxes, lab=labels, lq=low: _reference.match(anchors, b, lab, 0.5, 0.4, lq))
            ker = bench(
                lambda b=boxes, lab=labels, lq=low: torch.ops.retinaflow.match(anchors, b, lab, 0.5, 0.4, lq)
            )
            out[f"{key}_reference_ms"] = round(ref, 3)
            out[f"{key}_kernel_ms"] = round(ker, 3)
            out[f"{key}_speedup"] = round(ref / ker, 1)
    boxes, labels = ground_truth(8, 100)
    ref = loss_ms(anchors_levels, boxes, labels, reference=True)
    ker = loss_ms(anchors_levels, boxes, labels, reference=False)
    out["loss_fwd_bwd_b8_m100_reference_ms"] = round(ref, 2)
    out["loss_fwd_bwd_b8_m100_kernel_ms"] = round(ker, 2)
    emit("match", out)


if __name__ == "__main__":
    main()
