"""Anchor matching: thresholds, padding, low-quality matches, torchvision parity; the op on the CPU."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from retinaflow.config import MatcherConfig
from retinaflow.errors import ConfigError, DataError
from retinaflow.ops import _reference
from retinaflow.ops._reference import pairwise_iou
from retinaflow.ops.matching import BACKGROUND, IGNORE, match_anchors


def _boxes(n: int, g: torch.Generator, extent: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * extent
    wh = torch.rand(n, 2, generator=g) * 60 + 4
    return torch.cat([xy, xy + wh], dim=1)


def test_thresholds_and_ignore_band() -> None:
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    labels = torch.tensor([[7]])
    # anchor [0, 0, 10, h] inside the box has IoU h / 10
    heights = [6.0, 5.0, 4.5, 4.0, 3.0]
    anchors = torch.tensor([[0.0, 0.0, 10.0, h] for h in heights])
    out = match_anchors(anchors, gt, labels, MatcherConfig(fg_iou=0.5, bg_iou=0.4))
    assert out.dtype == torch.int64
    assert out.tolist() == [[0, 0, IGNORE, IGNORE, BACKGROUND]]  # fg at >= 0.5, bg below 0.4


def test_anchor_takes_its_best_ground_truth() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [100.0, 100.0, 110.0, 110.0]])
    gt = torch.tensor([[[19.0, 19.0, 30.0, 30.0], [0.0, 0.0, 10.0, 9.0]]])
    out = match_anchors(anchors, gt, torch.tensor([[0, 1]]), MatcherConfig())
    assert out.tolist() == [[1, 0, BACKGROUND]]


def test_padding_never_matches() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gt = torch.tensor(
        [
            [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]],  # second row is padding
            [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]],  # all padding
        ]
    )
    labels = torch.tensor([[2, -1], [-1, -1]])
    for low_quality in (False, True):
        out = match_anchors(anchors, gt, labels, MatcherConfig(allow_low_quality=low_quality))
        assert out.tolist() == [[0, BACKGROUND], [BACKGROUND, BACKGROUND]]
    empty = match_anchors(
        anchors, torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.int64), MatcherConfig()
    )
    assert empty.shape == (3, 2) and (empty == BACKGROUND).all()


def test_low_quality_matches() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 2.0], [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 3.0], [200.0, 200.0, 210.0, 210.0]]])  # IoUs .3 and .667; none
    labels = torch.tensor([[0, 1]])
    plain = match_anchors(anchors, gt, labels, MatcherConfig(fg_iou=0.7, bg_iou=0.4, allow_low_quality=False))
    assert plain.tolist() == [[BACKGROUND, IGNORE, BACKGROUND]]
    low = match_anchors(anchors, gt, labels, MatcherConfig(fg_iou=0.7, bg_iou=0.4, allow_low_quality=True))
    # the best anchor of gt 0 becomes foreground; gt 1 overlaps nothing and claims no IoU-0 anchor
    assert low.tolist() == [[BACKGROUND, 0, BACKGROUND]]


@pytest.mark.parametrize("low_quality", [False, True])
def test_batched_matches_torchvision_per_image(low_quality: bool) -> None:
    g = torch.Generator().manual_seed(0)
    anchors = _boxes(400, g)
    counts = [5, 0, 3]
    gt = torch.zeros(3, 5, 4)
    labels = torch.full((3, 5), -1)
    for i, n in enumerate(counts):
        gt[i, :n] = _boxes(n, g)
        labels[i, :n] = torch.randint(0, 4, (n,), generator=g)
    cfg = MatcherConfig(fg_iou=0.5, bg_iou=0.4, allow_low_quality=low_quality)
    ours = match_anchors(anchors, gt, labels, cfg)
    chunked = _reference.match(anchors, gt, labels, 0.5, 0.4, low_quality, max_elements=15 * 37)  # 11 chunks
    torch.testing.assert_close(chunked, ours)
    reference = Matcher(0.5, 0.4, allow_low_quality_matches=low_quality)
    for i, n in enumerate(counts):
        if n == 0:
            assert (ours[i] == BACKGROUND).all()
            continue
        expected = reference(box_iou(gt[i, :n], anchors))
        torch.testing.assert_close(ours[i], expected)
    assert (ours >= 0).any() and (ours == IGNORE).any()


def test_pairwise_iou_matches_box_iou() -> None:
    g = torch.Generator().manual_seed(3)
    anchors = _boxes(50, g, 50.0)
    gt = torch.stack([_boxes(4, g, 50.0), _boxes(4, g, 50.0)])
    valid = torch.tensor([[True, True, True, False], [True, False, True, True]])
    iou = pairwise_iou(anchors, gt, valid)
    assert iou.shape == (2, 50, 4)
    for b in range(2):
        expected = box_iou(anchors, gt[b]).masked_fill(~valid[b], -1.0)
        torch.testing.assert_close(iou[b], expected)


def test_bad_inputs() -> None:
    anchors = torch.zeros(4, 4)
    with pytest.raises(ConfigError, match="bg_iou"):
        match_anchors(
            anchors, torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.int64), MatcherConfig(0.4, 0.5)
        )
    with pytest.raises(ConfigError, match="anchors"):
        match_anchors(
            torch.zeros(4, 5), torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.int64), MatcherConfig()
        )
    with pytest.raises(DataError):
        match_anchors(anchors, torch.zeros(1, 4), torch.zeros(1, dtype=torch.int64), MatcherConfig())
    with pytest.raises(DataError):
        match_anchors(anchors, torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.int64), MatcherConfig())


def test_op_is_the_reference_on_the_cpu_and_passes_opcheck() -> None:
    g = torch.Generator().manual_seed(4)
    anchors = _boxes(60, g)
    gt = torch.stack([_boxes(4, g), _boxes(4, g)])
    labels = torch.tensor([[0, 1, -1, 2], [3, -1, -1, -1]])
    expected = _reference.match(anchors, gt, labels, 0.5, 0.4, True)
    assert torch.equal(match_anchors(anchors, gt, labels, MatcherConfig(allow_low_quality=True)), expected)
    assert torch.equal(torch.ops.retinaflow.match(anchors, gt, labels, 0.5, 0.4, True), expected)
    torch.library.opcheck(torch.ops.retinaflow.match.default, (anchors, gt, labels, 0.5, 0.4, False))
