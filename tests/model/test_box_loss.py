from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from retinaflow.config import LossConfig, MatcherConfig
from retinaflow.errors import ConfigError
from retinaflow.model.box_coder import encode
from retinaflow.model.box_loss import box_loss_per_anchor, giou_loss
from retinaflow.model.loss import detection_loss
from retinaflow.ops._reference import decode_deltas

GIOU = LossConfig(box_loss="giou")
ANCHORS = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 80.0, 48.0], [40.0, 0.0, 72.0, 64.0]])
GT = torch.tensor([[[2.0, 1.0, 30.0, 35.0], [20.0, 10.0, 70.0, 50.0], [44.0, 4.0, 70.0, 60.0]]])


def test_giou_is_zero_for_exact_deltas_and_matches_torchvision() -> None:
    exact = encode(ANCHORS[None], GT)
    torch.testing.assert_close(
        box_loss_per_anchor(exact, ANCHORS[None], GT, GIOU), torch.zeros(1, 3), atol=1e-5, rtol=0
    )
    deltas = exact + torch.tensor([0.1, -0.2, 0.3, -0.1])
    expected = generalized_box_iou_loss(decode_deltas(ANCHORS[None], deltas), GT, reduction="none")
    torch.testing.assert_close(box_loss_per_anchor(deltas, ANCHORS[None], GT, GIOU), expected)


def test_giou_loss_equals_torchvisions_on_overlapping_disjoint_and_nested_boxes_values_and_gradients() -> (
    None
):
    gen = torch.Generator().manual_seed(0)
    corner = torch.rand(2, 500, 2, generator=gen) * 100
    boxes = torch.cat([corner, corner + 1 + torch.rand(2, 500, 2, generator=gen) * 60], -1)
    target = boxes.flip(1).clone()  # pairs that overlap, are disjoint or nest, at random
    target[0, :50] = boxes[0, :50]  # and some exact matches (loss 0)
    ours_in, theirs_in = boxes.clone().requires_grad_(), boxes.clone().requires_grad_()
    ours, theirs = giou_loss(ours_in, target), generalized_box_iou_loss(theirs_in, target, reduction="none")
    torch.testing.assert_close(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad)


def test_giou_weight_2_is_the_default_and_smooth_l1_is_odtks() -> None:
    assert (LossConfig().box_loss, LossConfig().box_weight) == ("giou", 2.0)
    deltas = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    target = encode(ANCHORS[None], GT)
    expected = torch.nn.functional.smooth_l1_loss(deltas, target, beta=0.11, reduction="none").sum(2)
    smooth = LossConfig(box_loss="smooth_l1")
    torch.testing.assert_close(box_loss_per_anchor(deltas, ANCHORS[None], GT, smooth), expected)


def test_giou_detection_loss_is_finite_with_wild_background_deltas_and_has_gradients() -> None:
    cls = torch.zeros(1, 3, 2, requires_grad=True)
    box = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [1e4, -1e4, 80.0, 80.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True
    )
    gt_boxes, gt_labels = GT[:, :1], torch.tensor([[1]])
    out = detection_loss(cls, box, ANCHORS, gt_boxes, gt_labels, GIOU, MatcherConfig())
    assert torch.isfinite(out["loss"]) and out["box"] > 0
    out["loss"].backward()
    assert box.grad is not None and torch.isfinite(box.grad).all()
    assert box.grad[0, 1].abs().sum() == 0  # anchor 1 is not foreground: no box gradient


def test_unknown_box_loss_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"loss\.box_loss"):
        box_loss_per_anchor(torch.zeros(1, 3, 4), ANCHORS, GT, dataclasses.replace(GIOU, box_loss="l2"))
