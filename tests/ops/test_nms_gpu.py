"""CUDA NMS kernel against a plain greedy loop with the same tie order (run on the GPU machine).

The oracle (tests/ops/oracle.py) orders by score then lower row and computes IoU in float32 with
torchvision's CPU formula, as the kernel does, so the kept rows must match exactly, ties included.
Against torchvision's own batched_nms (whose tie order is unspecified) inputs are tie-free.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from tests.ops.gpu import CUDA_KERNEL_TESTS
from tests.ops.oracle import greedy_nms

from retinaflow.ops import _reference
from retinaflow.ops.boxes import batched_nms
from retinaflow.ops.detections import Detections

pytestmark = CUDA_KERNEL_TESTS


def make(batch, k, num_classes, seed, pad=0.1, spread=300.0, size=80.0, score_levels=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, k, 2, generator=g) * spread
    boxes = torch.cat([xy, xy + 1 + torch.rand(batch, k, 2, generator=g) * size], -1)
    scores = torch.rand(batch, k, generator=g)
    if score_levels:
        scores = torch.randint(0, score_levels, (batch, k), generator=g).float() / score_levels
    classes = torch.randint(0, num_classes, (batch, k), generator=g)
    classes[torch.rand(batch, k, generator=g) < pad] = -1
    return scores, boxes, classes


def check(scores, boxes, classes, iou, max_det):
    """Kernel output == oracle per image; returns the kernel's Detections (on the CPU)."""
    d = batched_nms(scores, boxes, classes, iou, max_det).to("cpu")
    assert d.scores.shape == (scores.shape[0], max_det) and d.boxes.shape == (scores.shape[0], max_det, 4)
    s, b, c = scores.cpu().float(), boxes.cpu().float(), classes.cpu().long()
    for i in range(scores.shape[0]):
        keep = greedy_nms(s[i], b[i], c[i], iou, max_det)
        n = keep.numel()
        assert int(d.counts[i]) == n, f"image {i}: {int(d.counts[i])} kept, oracle {n}"
        assert torch.equal(d.scores[i, :n], s[i, keep])
        assert torch.equal(d.boxes[i, :n], b[i, keep])
        assert torch.equal(d.classes[i, :n], c[i, keep])
        assert (d.scores[i, n:] == 0).all() and (d.boxes[i, n:] == 0).all() and (d.classes[i, n:] == -1).all()
    return d


CASES = [  # batch, K, classes, iou, max_det, score levels (0: continuous)
    (1, 1, 1, 0.5, 1, 0),
    (2, 50, 3, 0.5, 10, 0),
    (3, 1000, 80, 0.5, 100, 0),
    (1, 5000, 80, 0.5, 100, 0),
    (4, 5000, 5, 0.3, 300, 0),
    (2, 3000, 2, 0.7, 1000, 0),
    (2, 2000, 4, 0.5, 100, 5),  # heavy score ties
    (8, 777, 10, 0.6, 50, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_random_inputs_match_greedy_oracle(case, dtype):
    batch, k, num_classes, iou, max_det, levels = CASES[case]
    scores, boxes, classes = make(batch, k, num_classes, seed=case, score_levels=levels)
    check(scores.to(dtype).cuda(), boxes.to(dtype).cuda(), classes.cuda(), iou, max_det)


def test_matches_torchvision_batched_nms_on_tie_free_inputs():
    # 6000 rows: torchvision takes its per-class path (no coordinate offsets that would move IoUs)
    scores, boxes, classes = make(2, 6000, 20, seed=20, pad=0.0)
    scores, boxes, classes = scores.cuda(), boxes.cuda(), classes.cuda()
    d = batched_nms(scores, boxes, classes, 0.5, 6000)
    ref = Detections(*_reference.nms(scores, boxes, classes, 0.5, 6000))
    assert torch.equal(d.counts, ref.counts)
    for i in range(2):
        keep = torchvision.ops.batched_nms(boxes[i], scores[i], classes[i], 0.5)
        assert int(d.counts[i]) == keep.numel()
    for name in ("scores", "boxes", "classes"):
        assert torch.equal(getattr(d, name), getattr(ref, name)), name


def test_degenerate_boxes_and_padding():
    k = 64
    boxes = torch.tensor([10.0, 10.0, 50.0, 50.0]).repeat(4, k, 1)
    scores = torch.linspace(1, 0.01, k).repeat(4, 1)
    classes = torch.zeros(4, k, dtype=torch.int64)
    boxes[1, :, 2] = boxes[1, :, 0]  # image 1: zero width -> IoU NaN -> nothing suppressed
    classes[2] = -1  # image 2: all padding
    scores[3, ::2] = float("nan")  # image 3: NaN scores ignored, identical boxes -> one kept
    d = check(scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, 100)
    assert d.counts.tolist() == [1, k, 0, 1]


def test_equal_scores_and_identical_boxes_keep_the_lowest_row_per_class():
    boxes = torch.tensor([5.0, 5.0, 25.0, 30.0]).repeat(1, 12, 1)
    scores = torch.full((1, 12), 0.5)
    classes = torch.tensor([[3, 1, 3, 1, 2, 2, 3, 1, 0, 0, 2, 3]])
    d = check(scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, 10)
    assert d.classes[0, :4].tolist() == [3, 1, 2, 0]


def test_max_det_reached_exactly():
    scores, boxes, classes = make(2, 3000, 80, seed=21, spread=2000.0, size=20.0)
    d = check(scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, 100)
    assert d.counts.tolist() == [100, 100]


def test_many_rows_use_the_global_memory_workspace():
    scores, boxes, classes = make(2, 40000, 3, seed=22)
    check(scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, 200)


def test_int32_classes_non_contiguous_and_empty_inputs():
    scores, boxes, classes = make(3, 500, 6, seed=23)
    s = scores.t().contiguous().cuda().t()  # transposed storage
    b = boxes.permute(2, 0, 1).contiguous().cuda().permute(1, 2, 0)
    check(s, b, classes.int().cuda(), 0.5, 40)
    empty = batched_nms(
        torch.empty(2, 0).cuda(), torch.empty(2, 0, 4).cuda(), torch.empty(2, 0).long().cuda(), 0.5, 5
    )
    assert empty.counts.tolist() == [0, 0] and (empty.classes == -1).all()


def test_batch_mixing_empty_and_full_images():
    scores, boxes, classes = make(4, 2000, 8, seed=24)
    classes[0] = -1
    classes[2, 1:] = -1
    classes[2, 0] = 3
    d = check(scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, 100)
    assert d.counts[0] == 0 and d.counts[2] == 1 and d.counts[1] == 100


def test_opcheck_on_cuda():
    scores, boxes, classes = make(2, 300, 4, seed=25)
    torch.library.opcheck(
        torch.ops.retinaflow.nms.default, (scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, 30)
    )
