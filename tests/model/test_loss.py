from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retinaflow.config import AnchorConfig, LossConfig, MatcherConfig
from retinaflow.errors import DataError
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.loss import detection_loss

# The reference below is focal + smooth L1 with plain IoU matching (ODTK's recipe; the defaults moved on).
SMOOTH_L1 = LossConfig(box_loss="smooth_l1", box_weight=1.0)
NO_LOW_QUALITY = MatcherConfig(allow_low_quality=False)

# Five anchors, one image with two boxes (plus one padding row), a second image with no boxes:
#   anchor 0 == gt 0 (fg, class 2), anchor 1 has IoU .45 with gt 0 (ignored), anchor 2 far (bg),
#   anchor 3 close to gt 1 (fg, class 0, IoU .9), anchor 4 far (bg).
ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 10.0, 4.5],
        [100.0, 100.0, 110.0, 110.0],
        [50.0, 50.0, 70.0, 68.0],
        [200.0, 0.0, 220.0, 20.0],
    ]
)
GT_BOXES = torch.tensor(
    [
        [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 70.0], [0.0, 0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    ]
)
GT_LABELS = torch.tensor([[2, 0, -1], [-1, -1, -1]])
# per image, per anchor: (matched gt index or None, ignored)
ASSIGN = [
    [(0, False), (None, True), (None, False), (1, False), (None, False)],
    [(None, False)] * 5,
]
NUM_CLASSES = 3


def _outputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, NUM_CLASSES, generator=g) * 2, torch.randn(2, 5, 4, generator=g) * 0.3


def _reference(cls: torch.Tensor, box: torch.Tensor, cfg: LossConfig) -> tuple[float, float]:
    """Plain per-element focal loss and smooth L1, summed (not normalised)."""
    focal_sum, box_sum = 0.0, 0.0
    for b in range(2):
        for n in range(5):
            gt_index, ignored = ASSIGN[b][n]
            if ignored:
                continue
            for c in range(NUM_CLASSES):
                target = 1.0 if gt_index is not None and int(GT_LABELS[b, gt_index]) == c else 0.0
                p = 1.0 / (1.0 + math.exp(-float(cls[b, n, c])))
                p_t = p if target else 1.0 - p
                alpha_t = cfg.alpha if target else 1.0 - cfg.alpha
                focal_sum += -alpha_t * (1.0 - p_t) ** cfg.gamma * math.log(p_t)
            if gt_index is None:
                continue
            ax1, ay1, ax2, ay2 = ANCHORS[n].tolist()
            gx1, gy1, gx2, gy2 = GT_BOXES[b, gt_index].tolist()
            aw, ah, gw, gh = ax2 - ax1, ay2 - ay1, gx2 - gx1, gy2 - gy1
            deltas = [
                ((gx1 + gw / 2) - (ax1 + aw / 2)) / aw,
                ((gy1 + gh / 2) - (ay1 + ah / 2)) / ah,
                math.log(gw / aw),
                math.log(gh / ah),
            ]
            for d, t in zip(box[b, n].tolist(), deltas, strict=True):
                diff = abs(d - t)
                beta = cfg.smooth_l1_beta
                box_sum += 0.5 * diff**2 / beta if diff < beta else diff - 0.5 * beta
    return focal_sum, box_sum


@pytest.mark.parametrize(
    "loss_cfg", [SMOOTH_L1, LossConfig(alpha=0.5, gamma=1.0, box_loss="smooth_l1", box_weight=2.0)]
)
def test_matches_per_element_reference(loss_cfg: LossConfig) -> None:
    cls, box = _outputs()
    out = detection_loss(cls, box, ANCHORS, GT_BOXES, GT_LABELS, loss_cfg, NO_LOW_QUALITY)
    focal_sum, box_sum = _reference(cls, box, loss_cfg)
    num_fg = 2
    assert set(out) == {"cls", "box", "loss"}
    assert out["cls"].item() == pytest.approx(focal_sum / num_fg, rel=1e-5)
    assert out["box"].item() == pytest.approx(box_sum / num_fg * loss_cfg.box_weight, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["cls"].item() + out["box"].item(), rel=1e-6)


def test_normalisation() -> None:
    cls, box = _outputs(1)
    cfg = SMOOTH_L1
    focal_sum, box_sum = _reference(cls, box, cfg)
    given = detection_loss(cls, box, ANCHORS, GT_BOXES, GT_LABELS, cfg, NO_LOW_QUALITY, num_fg_norm=8.0)
    assert given["cls"].item() == pytest.approx(focal_sum / 8, rel=1e-5)
    seen: list[float] = []

    def all_reduced(count: torch.Tensor) -> torch.Tensor:  # what a DDP caller would pass
        seen.append(count.item())
        return count * 4 / 2

    fn = detection_loss(cls, box, ANCHORS, GT_BOXES, GT_LABELS, cfg, NO_LOW_QUALITY, num_fg_norm=all_reduced)
    assert seen == [2.0]
    assert fn["box"].item() == pytest.approx(box_sum / 4, rel=1e-5)
    # a batch without any foreground divides by 1, not 0
    empty = detection_loss(cls[1:], box[1:], ANCHORS, GT_BOXES[1:], GT_LABELS[1:], cfg, NO_LOW_QUALITY)
    p = torch.sigmoid(cls[1].double())
    all_background = (-(1 - cfg.alpha) * p**cfg.gamma * torch.log(1 - p)).sum().item()
    assert empty["cls"].item() == pytest.approx(all_background, rel=1e-5)
    assert empty["box"].item() == 0.0


def test_mismatched_batch_or_anchor_count_raises() -> None:
    cls, box = _outputs()
    with pytest.raises(DataError, match="anchors"):
        detection_loss(cls, box, ANCHORS[:4], GT_BOXES, GT_LABELS, SMOOTH_L1, NO_LOW_QUALITY)
    with pytest.raises(DataError):
        detection_loss(cls, box, ANCHORS, GT_BOXES[:1], GT_LABELS[:1], SMOOTH_L1, NO_LOW_QUALITY)


def test_level_lists_bf16_autocast_and_gradients() -> None:
    cfg = AnchorConfig(strides=(8, 16), ratios=(1.0,), scales=(1.0, 2.0))
    anchors = generate_anchors(cfg, (64, 64))
    g = torch.Generator().manual_seed(2)
    a = cfg.num_anchors
    cls = [torch.randn(2, a * 4, s, s, generator=g).requires_grad_() for s in (8, 4)]
    box = [torch.randn(2, a * 4, s, s, generator=g).mul(0.1).requires_grad_() for s in (8, 4)]
    gt = torch.tensor(
        [[[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0]], [[30.0, 2.0, 60.0, 20.0], [0, 0, 60, 60]]]
    )
    labels = torch.tensor([[3, -1], [1, 0]])
    cfgs = (SMOOTH_L1, NO_LOW_QUALITY)
    out = detection_loss(cls, box, anchors, gt, labels, *cfgs)
    same = detection_loss(cls, box, torch.cat(anchors), gt, labels, *cfgs)
    torch.testing.assert_close(out["loss"], same["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(t.grad).all() for t in cls + box)  # padding rows create no inf/nan
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = detection_loss(
            [c.bfloat16() for c in cls], [b.bfloat16() for b in box], anchors, gt, labels, *cfgs
        )
    assert all(v.dtype == torch.float32 for v in low.values())
    torch.testing.assert_close(low["loss"], out["loss"].detach(), rtol=2e-2, atol=1e-2)


# Ops whose output size or value the host must read back from the device: on CUDA each one stalls the
# CPU until the GPU has caught up, so the next kernels are not queued while the GPU works.
_HOST_SYNC_OPS = {"nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique2", "is_nonzero"}


class _SyncingOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for i in a
        )
        if name in _HOST_SYNC_OPS or bool_index:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("box_loss", ["giou", "smooth_l1"])
def test_the_loss_and_its_backward_need_no_data_dependent_shapes(box_loss: str) -> None:
    """No nonzero / boolean indexing / .item() in the loss, forward or backward: they were 12 host syncs
    per training step on the GPU (profiled on H200s with torch.cuda.set_sync_debug_mode)."""
    gen = torch.Generator().manual_seed(0)
    anchors = generate_anchors(AnchorConfig(), (128, 128), torch.device("cpu"), torch.float32)
    n = sum(len(a) for a in anchors)
    cls = torch.randn(2, n, 3, generator=gen).requires_grad_()
    box = (torch.randn(2, n, 4, generator=gen) * 0.1).requires_grad_()
    gt_boxes = torch.tensor(
        [[[10.0, 10.0, 60.0, 70.0], [64.0, 0.0, 128.0, 40.0]], [[0, 0, 90, 90], [0, 0, 0, 0]]]
    )
    gt_labels = torch.tensor([[0, 2], [1, -1]])
    with _SyncingOps() as ops:
        out = detection_loss(
            cls, box, anchors, gt_boxes, gt_labels, LossConfig(box_loss=box_loss), MatcherConfig()
        )
        out["loss"].backward()
    assert out["box"] > 0 and ops.found == []
