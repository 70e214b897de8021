"""CUDA anchor-matching kernel against the PyTorch reference (run on the GPU machine).

The kernel reproduces every float32 rounding of the reference IoU and takes the first ground truth
among ties, so assignments must be identical, element for element, including low-quality matches.
"""

from __future__ import annotations

import pytest
import torch
from tests.ops.gpu import CUDA_KERNEL_TESTS

from retinaflow.config import AnchorConfig
from retinaflow.model.anchors import generate_anchors
from retinaflow.ops import _reference
from retinaflow.ops.graph import CudaGraphRunner

pytestmark = CUDA_KERNEL_TESTS


def anchors_for(height: int, width: int) -> torch.Tensor:
    return torch.cat(generate_anchors(AnchorConfig(), (height, width), "cuda", torch.float32))


def ground_truth(batch: int, m: int, seed: int, height: int, width: int, pad: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, m, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
    wh = 4 + torch.rand(batch, m, 2, generator=g) * torch.tensor([width * 0.4, height * 0.4])
    boxes = torch.cat([xy, xy + wh], -1)
    labels = torch.randint(0, 80, (batch, m), generator=g)
    labels[torch.rand(batch, m, generator=g) < pad] = -1
    return boxes.cuda(), labels.cuda()


def check(anchors, boxes, labels, fg=0.5, bg=0.4, low_quality=True) -> torch.Tensor:
    got = torch.ops.retinaflow.match(anchors, boxes, labels, fg, bg, low_quality)
    expected = _reference.match(anchors, boxes, labels, fg, bg, low_quality)
    assert got.dtype == torch.int64 and got.shape == expected.shape
    mismatched = (got != expected).nonzero()
    assert mismatched.numel() == 0, f"{len(mismatched)} assignments differ, first at {mismatched[0].tolist()}"
    return got


@pytest.mark.parametrize("low_quality", [False, True])
@pytest.mark.parametrize("m", [1, 7, 100, 300])  # 300: more than one shared-memory tile of ground truths
def test_random_batches_equal_the_reference(m: int, low_quality: bool) -> None:
    anchors = anchors_for(384, 512)
    boxes, labels = ground_truth(4, m, seed=m, height=384, width=512)
    got = check(anchors, boxes, labels, low_quality=low_quality)
    assert (got >= 0).any() and (got == _reference.BACKGROUND).any()


def test_thresholds_and_an_image_without_ground_truth() -> None:
    anchors = anchors_for(256, 256)
    boxes, labels = ground_truth(3, 20, seed=1, height=256, width=256)
    labels[1] = -1  # image 1: padding only
    for fg, bg in ((0.5, 0.4), (0.6, 0.6), (0.3, 0.1)):
        got = check(anchors, boxes, labels, fg, bg)
        assert (got[1] == _reference.BACKGROUND).all()


def test_adversarial_boxes() -> None:
    anchors = anchors_for(256, 384)
    boxes, labels = ground_truth(2, 12, seed=2, height=256, width=384, pad=0.0)
    boxes[0, 1] = boxes[0, 0]  # identical ground truths: the first index wins every tie
    boxes[0, 2] = boxes[0, 0]
    boxes[0, 3] = torch.tensor([50.0, 50.0, 50.0, 90.0])  # zero area
    boxes[0, 4] = anchors[1234]  # exactly an anchor: IoU 1
    boxes[0, 5] = torch.tensor([0.0, 0.0, 384.0, 256.0])  # the whole image
    boxes[1, 0] = torch.tensor([-5000.0, -5000.0, -4990.0, -4990.0])  # beyond every anchor
    boxes[1, 1] = torch.tensor([5000.0, 5000.0, 5001.0, 5001.0])
    got = check(anchors, boxes, labels)
    assert got[0, 1234] == 4
    assert not (got[0] == 1).any() and not (got[0] == 2).any()
    assert not (got[1] == 0).any() and not (got[1] == 1).any()


def test_input_types_and_layouts() -> None:
    anchors = anchors_for(256, 256)
    boxes, labels = ground_truth(2, 30, seed=3, height=256, width=256)
    expected = _reference.match(anchors, boxes, labels, 0.5, 0.4, True)
    wide = torch.zeros(2, 30, 8, device="cuda")
    wide[..., ::2] = boxes  # non-contiguous boxes
    assert torch.equal(
        torch.ops.retinaflow.match(anchors, wide[..., ::2], labels.int(), 0.5, 0.4, True), expected
    )
    half = boxes.round().half()  # integer coordinates: exact in fp16
    assert torch.equal(
        torch.ops.retinaflow.match(anchors, half, labels, 0.5, 0.4, True),
        _reference.match(anchors, half, labels, 0.5, 0.4, True),
    )


def test_no_ground_truth_rows_and_no_anchors() -> None:
    anchors = anchors_for(128, 128)
    no_boxes = torch.zeros(2, 0, 4, device="cuda")
    empty = torch.ops.retinaflow.match(
        anchors, no_boxes, torch.zeros(2, 0, dtype=torch.long, device="cuda"), 0.5, 0.4, True
    )
    assert empty.shape == (2, anchors.shape[0]) and (empty == _reference.BACKGROUND).all()
    boxes, labels = ground_truth(2, 5, seed=4, height=128, width=128)
    assert torch.ops.retinaflow.match(anchors[:0], boxes, labels, 0.5, 0.4, True).shape == (2, 0)


def test_captured_in_a_cuda_graph() -> None:
    anchors = anchors_for(256, 256)
    boxes, labels = ground_truth(2, 16, seed=5, height=256, width=256)
    runner = CudaGraphRunner(
        lambda b, lab: torch.ops.retinaflow.match(anchors, b, lab, 0.5, 0.4, True), [boxes, labels]
    )
    for seed in (6, 7):
        b, lab = ground_truth(2, 16, seed=seed, height=256, width=256)
        assert torch.equal(runner(b, lab), _reference.match(anchors, b, lab, 0.5, 0.4, True))


def test_opcheck_on_cuda() -> None:
    anchors = anchors_for(128, 128)
    boxes, labels = ground_truth(2, 6, seed=8, height=128, width=128)
    torch.library.opcheck(torch.ops.retinaflow.match.default, (anchors, boxes, labels, 0.5, 0.4, True))
