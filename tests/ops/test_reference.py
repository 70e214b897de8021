"""The pure-PyTorch reference: decode against a per-image loop, NMS against torchvision and a greedy loop."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from tests.ops.oracle import GRID_THRESH, greedy_nms, loop_decode, random_heads

from retinaflow.ops import _reference
from retinaflow.ops.detections import Detections

SHAPES = [(6, 8), (3, 4), (2, 2)]


def _slots(scores, boxes, classes, image, level, top_n):
    sl = slice(level * top_n, (level + 1) * top_n)
    return scores[image, sl], boxes[image, sl], classes[image, sl]


def test_decode_matches_per_image_loop_with_continuous_scores():
    cls, box, anchors = random_heads(3, SHAPES, 3, 5, seed=0, mean=-1.0)
    cls = [c + torch.rand_like(c) * 1e-3 for c in cls]  # no ties: order is unambiguous
    sizes = torch.tensor([[40, 60], [48, 64], [20, 30]])
    top_n = 50
    scores, boxes, classes = _reference.decode(cls, box, anchors, sizes, 0.2, top_n)
    assert scores.shape == classes.shape == (3, 3 * top_n) and boxes.shape == (3, 3 * top_n, 4)
    assert scores.dtype == torch.float32 and classes.dtype == torch.int64
    expected = loop_decode(cls, box, anchors, sizes, 0.2, top_n)
    for i in range(3):
        for level in range(3):
            s, b, c = _slots(scores, boxes, classes, i, level, top_n)
            es, eb, ec = expected[i][level]
            k = es.numel()
            torch.testing.assert_close(s[:k], es, rtol=0, atol=1e-6)
            torch.testing.assert_close(b[:k], eb, rtol=1e-5, atol=1e-4)
            assert torch.equal(c[:k], ec)
            assert (s[k:] == 0).all() and (b[k:] == 0).all() and (c[k:] == -1).all()


def test_decode_top_n_limits_candidates_and_pads_small_levels():
    cls, box, anchors = random_heads(2, [(4, 4), (1, 1)], 2, 3, seed=1, mean=2.0)  # almost all above
    top_n = 10
    scores, _, classes = _reference.decode(cls, box, anchors, torch.tensor([[32, 32], [32, 32]]), 0.05, top_n)
    assert (classes[:, :top_n] >= 0).all()  # level 0 has 96 candidates: exactly top_n kept
    level1 = classes[:, top_n:]
    assert ((level1 >= 0).sum(1) <= 6).all() and (level1[:, 6:] == -1).all()  # 1x1x2x3 = 6 pairs
    assert (scores[:, : top_n - 1] >= scores[:, 1:top_n]).all()


def test_decode_ties_break_by_lower_flat_index():
    h, w, a, c = 2, 3, 2, 4
    cls = [torch.zeros(1, a * c, h, w)]  # every pair scores 0.5
    box = [torch.zeros(1, a * 4, h, w)]
    anchors = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(h * w * a, 1)]
    scores, _, classes = _reference.decode(cls, box, anchors, torch.tensor([[16, 24]]), 0.1, 7)
    # flat index ((y * W + x) * A + a) * C + c: the first 7 are anchor 0 classes 0..3, anchor 1 classes 0..2
    assert classes[0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert torch.allclose(scores, torch.full_like(scores, 0.5))


def test_decode_nothing_above_threshold_is_all_padding():
    cls, box, anchors = random_heads(2, SHAPES, 3, 5, seed=2, mean=-8.0)
    scores, boxes, classes = _reference.decode(cls, box, anchors, torch.tensor([[50, 60]] * 2), 0.5, 20)
    assert (scores == 0).all() and (boxes == 0).all() and (classes == -1).all()


def test_decode_clamps_boxes_to_each_image():
    cls, box, anchors = random_heads(2, [(4, 4)], 1, 2, seed=3, mean=3.0)
    box = [torch.full_like(box[0], 5.0)]  # huge boxes: dw, dh clamped, then clipped to the image
    sizes = torch.tensor([[20, 30], [31, 17]])
    _, boxes, classes = _reference.decode(cls, box, anchors, sizes, 0.05, 32)
    for i in range(2):
        real = boxes[i][classes[i] >= 0]
        assert real.numel() > 0
        assert (real >= 0).all()
        assert (real[:, 0::2] <= sizes[i, 1]).all() and (real[:, 1::2] <= sizes[i, 0]).all()
        assert (real[:, 2] == sizes[i, 1]).any() and (real[:, 3] == sizes[i, 0]).any()


def test_decode_accepts_channels_last_and_half_inputs():
    cls, box, anchors = random_heads(2, SHAPES, 3, 4, seed=4, mean=-1.0)  # grid values are exact in fp16
    sizes = torch.tensor([[40, 50], [44, 60]])
    ref = _reference.decode(cls, box, anchors, sizes, GRID_THRESH, 30)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in cls]
    bl = [t.contiguous(memory_format=torch.channels_last) for t in box]
    for got in (
        _reference.decode(cl, bl, anchors, sizes, GRID_THRESH, 30),
        _reference.decode([t.half() for t in cls], [t.half() for t in box], anchors, sizes, GRID_THRESH, 30),
    ):
        assert torch.equal(got[2], ref[2])
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1], rtol=2e-3, atol=2e-2)


def test_decode_deltas_clamp_log_sizes():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 32.0]])
    boxes = _reference.decode_deltas(anchors, torch.tensor([[0.0, 0.0, 50.0, 1e4]]))  # exp(1e4) is inf
    assert torch.isfinite(boxes).all()
    scale = math.exp(_reference.BBOX_XFORM_CLIP)  # 1000 / 16
    torch.testing.assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(16.0 * scale))
    torch.testing.assert_close(boxes[0, 3] - boxes[0, 1], torch.tensor(32.0 * scale))
    # negative log-sizes are not clamped: boxes shrink
    small = _reference.decode_deltas(anchors, torch.tensor([[0.0, 0.0, -math.log(4.0), 0.0]]))
    torch.testing.assert_close(small, torch.tensor([[6.0, 0.0, 10.0, 32.0]]))


def _random_dets(batch, k, num_classes, seed, pad_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, k, 2, generator=g) * 200
    wh = torch.rand(batch, k, 2, generator=g) * 80 + 1
    boxes = torch.cat([xy, xy + wh], -1)
    scores = torch.rand(batch, k, generator=g)
    classes = torch.randint(0, num_classes, (batch, k), generator=g)
    classes[torch.rand(batch, k, generator=g) < pad_fraction] = -1
    return scores, boxes, classes


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision_and_greedy_loop(iou):
    scores, boxes, classes = _random_dets(3, 300, 4, seed=6)
    max_det = 60
    d = Detections(*_reference.nms(scores, boxes, classes, iou, max_det))
    assert d.scores.shape == (3, max_det) and d.boxes.shape == (3, max_det, 4)
    assert d.classes.dtype == torch.int64 and d.counts.dtype == torch.int64
    for i in range(3):
        keep = greedy_nms(scores[i], boxes[i], classes[i], iou, max_det)
        valid = classes[i] >= 0
        tv = torch.where(valid)[0][
            torchvision.ops.batched_nms(boxes[i][valid], scores[i][valid], classes[i][valid], iou)
        ][:max_det]
        assert torch.equal(keep, tv)
        n = int(d.counts[i])
        assert n == keep.numel()
        assert torch.equal(d.scores[i, :n], scores[i, keep])
        assert torch.equal(d.boxes[i, :n], boxes[i, keep])
        assert torch.equal(d.classes[i, :n], classes[i, keep])
        assert (d.scores[i, n:] == 0).all() and (d.boxes[i, n:] == 0).all() and (d.classes[i, n:] == -1).all()


def test_nms_max_det_reached_and_padding_rows_ignored():
    scores, boxes, classes = _random_dets(2, 400, 80, seed=7)
    classes[1] = -1  # image 1 is all padding
    scores[0, :10] = float("nan")
    d = Detections(*_reference.nms(scores, boxes, classes, 0.5, 25))
    assert d.counts.tolist() == [25, 0]
    assert not torch.isnan(d.scores).any()
    assert (d.scores[0, :-1] >= d.scores[0, 1:]).all()
    assert (d.classes[1] == -1).all()


def test_nms_identical_boxes_suppress_within_a_class_only():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(6, 1)[None]
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    classes = torch.tensor([[0, 0, 1, 1, 0, 2]])
    d = Detections(*_reference.nms(scores, boxes, classes, 0.5, 10))
    assert d.counts.tolist() == [3]
    assert d.classes[0, :3].tolist() == [0, 1, 2]
    assert torch.allclose(d.scores[0, :3], torch.tensor([0.9, 0.7, 0.4]))


def test_nms_zero_area_boxes_are_never_suppressed():
    boxes = torch.tensor([[5.0, 5.0, 5.0, 9.0]]).repeat(4, 1)[None]  # width 0: IoU is 0/0 = NaN
    scores, classes = torch.tensor([[0.4, 0.3, 0.2, 0.1]]), torch.zeros(1, 4, dtype=torch.int64)
    d = Detections(*_reference.nms(scores, boxes, classes, 0.5, 10))
    assert d.counts.tolist() == [4]
