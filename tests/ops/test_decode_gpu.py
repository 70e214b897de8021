"""CUDA decode kernel against the reference (run on the GPU machine; skipped without CUDA).

Logits sit on a 1/64 grid (many exact ties) and the threshold between grid points, so the comparison is
exact: same candidates in the same slots (ties by lower flat index), scores to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from tests.ops.gpu import CUDA_KERNEL_TESTS
from tests.ops.oracle import GRID_THRESH, random_heads

from retinaflow.config import InferConfig
from retinaflow.ops import _reference, boxes
from retinaflow.ops.graph import CudaGraphRunner

pytestmark = CUDA_KERNEL_TESTS

SHAPES = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
R50_800x1344 = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


def _cuda(ts):
    return [t.cuda() for t in ts]


def check(cls, box, anchors, sizes, thresh, top_n, capacity=0):
    """Kernel on CUDA inputs == reference on CPU copies; returns the kernel outputs (capacity 0: default)."""
    got = torch.ops.retinaflow.decode(cls, box, anchors, sizes, thresh, top_n, capacity)
    ref = _reference.decode(
        [c.cpu() for c in cls], [b.cpu() for b in box], [a.cpu() for a in anchors], sizes.cpu(), thresh, top_n
    )
    scores, boxes_, classes = (g.cpu() for g in got)
    assert scores.shape == ref[0].shape and boxes_.shape == ref[1].shape
    assert torch.equal(classes, ref[2]), "different candidates or order"
    torch.testing.assert_close(scores, ref[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(boxes_, ref[1], rtol=1e-5, atol=2e-3)
    return scores, boxes_, classes


CASES = [  # batch, anchors, classes, logit mean, top_n
    (1, 9, 20, -3.0, 100),
    (3, 3, 4, -1.0, 7),
    (2, 1, 1, 0.0, 1),
    (4, 9, 80, -2.0, 1000),
    (2, 3, 7, 1.0, 50),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_random_inputs_match_reference(case, dtype):
    batch, a, c, mean, top_n = CASES[case]
    cls, box, anchors = random_heads(batch, SHAPES, a, c, seed=case, mean=mean, dtype=dtype)
    sizes = torch.tensor([[90 - 7 * i, 150 - 11 * i] for i in range(batch)])
    check(_cuda(cls), _cuda(box), _cuda(anchors), sizes.cuda(), GRID_THRESH, top_n)


@pytest.mark.parametrize("capacity", [1, 5, 64])
def test_overflowing_capacity_takes_the_exact_slow_path(capacity):
    cls, box, anchors = random_heads(2, SHAPES, 3, 6, seed=10, mean=0.0)
    sizes = torch.tensor([[96, 160], [80, 120]]).cuda()
    for top_n in (3, 40, 500):
        check(_cuda(cls), _cuda(box), _cuda(anchors), sizes, GRID_THRESH, top_n, capacity)


def test_score_ties_break_by_lower_index():
    cls, box, anchors = random_heads(2, SHAPES, 3, 5, seed=11)
    cls = [torch.zeros_like(c) for c in cls]  # every pair ties
    _, _, classes = check(
        _cuda(cls), _cuda(box), _cuda(anchors), torch.tensor([[96, 160]] * 2).cuda(), 0.1, 13
    )
    assert classes[0, :13].tolist() == [i % 5 for i in range(13)]


def test_nothing_above_threshold_and_mixed_batch():
    cls, box, anchors = random_heads(3, SHAPES, 3, 5, seed=12, mean=-3.0)
    cls = [c.clone() for c in cls]
    for c in cls:
        c[0] = -10.0  # image 0: nothing
        c[2] = 4.0  # image 2: everything
    scores, _, classes = check(
        _cuda(cls), _cuda(box), _cuda(anchors), torch.tensor([[96, 160]] * 3).cuda(), GRID_THRESH, 30
    )
    assert (classes[0] == -1).all() and (scores[0] == 0).all()
    assert (classes[2, :30] >= 0).all()
    above_all = boxes.decode_detections(
        _cuda(cls), _cuda(box), _cuda(anchors), torch.tensor([[96, 160]] * 3).cuda(), 0.999, 5
    )
    assert (above_all[2] == -1).all() and (above_all[0] == 0).all()


def test_non_contiguous_inputs():
    cls, box, anchors = random_heads(4, SHAPES, 3, 5, seed=13, mean=-1.0)
    sizes = torch.tensor([[96, 160]] * 2, dtype=torch.int32).cuda()
    cl = [
        c.cuda().contiguous(memory_format=torch.channels_last)[::2] for c in cls
    ]  # channels_last, every 2nd
    bl = [b.cuda().contiguous(memory_format=torch.channels_last)[::2] for b in box]
    check(cl, bl, _cuda(anchors), sizes, GRID_THRESH, 25)
    # general strides: a transposed copy viewed back, and a slice along the width
    ct = [c.cuda().transpose(2, 3).contiguous().transpose(2, 3)[1:3] for c in cls]
    bt = [torch.cat([b, b], dim=3).cuda()[1:3, :, :, : b.shape[3]] for b in box]
    check(ct, bt, _cuda(anchors), sizes, GRID_THRESH, 25)


@pytest.mark.parametrize("top_n", [5000, 16384])
def test_large_top_n_uses_large_shared_memory(top_n):
    cls, box, anchors = random_heads(2, [(40, 60), (20, 30)], 9, 4, seed=14, mean=1.0)
    check(_cuda(cls), _cuda(box), _cuda(anchors), torch.tensor([[320, 480]] * 2).cuda(), GRID_THRESH, top_n)


def test_realistic_r50_sizes_half_precision():
    """800x1344 input, 9 anchors, 80 classes: ~5000 candidates per image, top_n 1000."""
    cls, box, anchors = random_heads(2, R50_800x1344, 9, 80, seed=15, mean=-5.4, dtype=torch.float16)
    for c in cls:
        c[1] -= 0.5  # a quieter second image
    _, _, classes = check(
        _cuda(cls),
        _cuda(box),
        _cuda(anchors),
        torch.tensor([[800, 1333], [800, 1200]]).cuda(),
        GRID_THRESH,
        1000,
    )
    assert (classes[0, :1000] >= 0).all()  # image 0, level 0: ~3700 candidates, top 1000 kept
    assert 100 < int((classes[1, :1000] >= 0).sum()) < 1000


def test_postprocess_is_capturable_in_a_cuda_graph():
    cls, box, anchors = random_heads(2, SHAPES, 9, 8, seed=16, mean=-1.0)
    anchors = _cuda(anchors)
    sizes = torch.tensor([[96, 160], [90, 150]]).cuda()
    cfg = InferConfig(score_thresh=GRID_THRESH, top_n=1000, nms_iou=0.5, max_det=50)  # NMS: 100 KB smem
    levels = len(cls)

    def pipeline(*heads):
        return boxes.postprocess(list(heads[:levels]), list(heads[levels:]), anchors, sizes, cfg)

    run = CudaGraphRunner(pipeline, _cuda(cls) + _cuda(box))
    fresh_cls, fresh_box, _ = random_heads(2, SHAPES, 9, 8, seed=17, mean=-1.0)
    fresh = _cuda(fresh_cls) + _cuda(fresh_box)
    replayed = run(*fresh)
    eager = pipeline(*fresh)
    for name in ("scores", "boxes", "classes", "counts"):
        assert torch.equal(getattr(replayed, name), getattr(eager, name)), name
    assert (eager.counts > 0).all()


def test_opcheck_on_cuda():
    cls, box, anchors = random_heads(2, SHAPES[:2], 3, 4, seed=18, mean=-1.0)
    args = (
        _cuda(cls),
        _cuda(box),
        _cuda(anchors),
        torch.tensor([[90, 150], [80, 120]]).cuda(),
        GRID_THRESH,
        9,
        0,
    )
    torch.library.opcheck(torch.ops.retinaflow.decode.default, args)


@pytest.mark.parametrize("capacity", [0, 1100])
def test_an_overflowing_level_is_refined_to_the_exact_top_n(capacity):
    """Far more candidates than the buffer holds (P3 of R50 at 800x1344, about half its 12 M pairs above the
    threshold): the histogram refinement's cut, with the 1/64 grid's many ties at it, gives exactly the
    reference's top_n (capacity 1100: the ties at the cut may not fit, and the single-block path decides)."""
    cls, box, anchors = random_heads(1, R50_800x1344, 9, 80, seed=17, mean=0.0, dtype=torch.float16)
    sizes = torch.tensor([[800, 1333]]).cuda()
    _, _, classes = check(_cuda(cls), _cuda(box), _cuda(anchors), sizes, GRID_THRESH, 1000, capacity)
    assert (classes[0] >= 0).all()  # every level keeps its full top_n
