from __future__ import annotations

import pytest
import torch

from retinaflow.errors import ConfigError
from retinaflow.model.head import LevelBatchNorm, MergedHead, RetinaNetHead, UnsharedHead, unshare_level_norms


def test_output_shapes() -> None:
    head = RetinaNetHead(channels=16, num_anchors=9, num_classes=5, num_convs=2)
    feats = [torch.randn(2, 16, s, s) for s in (16, 8, 4, 2, 1)]
    cls, box = head(feats)
    assert [tuple(c.shape) for c in cls] == [(2, 45, s, s) for s in (16, 8, 4, 2, 1)]
    assert [tuple(b.shape) for b in box] == [(2, 36, s, s) for s in (16, 8, 4, 2, 1)]
    assert head.num_classes == 5 and head.num_anchors == 9
    assert len(head.cls_subnet) == 4  # 2 x (conv, relu)


def test_shared_across_levels() -> None:
    head = RetinaNetHead(channels=8, num_anchors=1, num_classes=2, num_convs=1)
    f = torch.randn(1, 8, 4, 4)
    cls, box = head([f, f])
    torch.testing.assert_close(cls[0], cls[1])
    torch.testing.assert_close(box[0], box[1])


@pytest.mark.parametrize("prior", [0.01, 0.1])
def test_prior_initialisation(prior: float) -> None:
    torch.manual_seed(0)
    head = RetinaNetHead(channels=64, num_anchors=9, num_classes=20, num_convs=4, prior=prior)
    for conv in [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.1)
    torch.testing.assert_close(head.box_pred.bias, torch.zeros_like(head.box_pred.bias))
    cls, _ = head([torch.randn(2, 64, 8, 8) * 3])
    scores = torch.sigmoid(cls[0])
    assert scores.mean().item() == pytest.approx(prior, rel=0.05)
    assert (scores - prior).abs().max().item() < prior * 0.2


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="prior"):
        RetinaNetHead(8, 9, 3, prior=1.0)
    with pytest.raises(ConfigError):
        RetinaNetHead(8, 9, 0)


@pytest.mark.parametrize(("norm", "convs"), [("gn", 4), ("none", 4), ("gn", 1), ("none", 0)])
def test_merged_head_gives_the_same_outputs(norm, convs):
    torch.manual_seed(0)
    head = RetinaNetHead(64, 9, 5, convs, norm=norm).eval()
    with torch.no_grad():
        for p in head.parameters():  # not the init's zero biases / unit affine: every copied tensor matters
            p.normal_(std=0.1)
    merged = MergedHead(head).eval()
    assert len(merged.towers) == 1  # shared by the levels
    convs_in_tower = sum(isinstance(m, torch.nn.Conv2d) for m in merged.towers[0])
    assert convs_in_tower == convs  # one merged convolution per layer of the two subnets
    features = [torch.randn(2, 64, s, s + 3) for s in (16, 8, 1)]
    with torch.no_grad():
        want, got = head(features), merged(features)
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _bn_head_with_statistics(convs: int = 2) -> tuple[RetinaNetHead, list[torch.Tensor]]:
    """A ``norm="bn"`` head whose levels have learnt other statistics (levels of other scales), in eval
    mode, with non-trivial weights everywhere; and features at three levels."""
    torch.manual_seed(0)
    head = RetinaNetHead(32, 9, 5, convs, norm="bn", num_levels=3)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.1)
    features = [torch.randn(2, 32, s, s + 3) * scale for s, scale in ((16, 1.0), (8, 4.0), (2, 0.25))]
    head.train()
    for _ in range(20):  # momentum 0.1: the running statistics approach each level's own
        head(features)
    return head.eval(), features


def test_bn_head_normalises_each_level_with_its_own_statistics():
    head, features = _bn_head_with_statistics()
    norms = [m for m in head.cls_subnet if isinstance(m, LevelBatchNorm)]
    assert len(norms) == 2 and all(len(n.levels) == 3 for n in norms)
    first = norms[0].levels
    var = [first[level].running_var.mean().item() for level in range(3)]
    assert var[1] > 4 * var[0] > 16 * var[2]  # the levels' scales (1, 4, 0.25) squared, as learnt
    # training mode: every level's output is normalised by its own batch statistics
    head.train()
    x = head.cls_subnet[0](features[1])
    y = head.cls_subnet[1](x, 1)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), first[1].bias, atol=1e-4, rtol=0)


def test_unshared_head_folds_each_levels_batchnorm_into_its_convolutions():
    head, features = _bn_head_with_statistics()
    with torch.no_grad():
        want = head(features)
        unshared = unshare_level_norms(head)
        got = unshared(features)
    assert isinstance(unshared, UnsharedHead)
    assert not any(isinstance(m, (LevelBatchNorm, torch.nn.BatchNorm2d)) for m in unshared.modules())
    assert len(unshared.cls_towers) == 3 and len(unshared.cls_towers[0]) == 4  # (conv, relu) x 2
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    merged = MergedHead(unshared).eval()  # the CUDA engines' form: one merged tower per level
    assert len(merged.towers) == 3
    with torch.no_grad():
        got = merged(features)
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_heads_without_level_norms_stay_shared():
    head = RetinaNetHead(16, 9, 5, 1, norm="gn")
    assert unshare_level_norms(head) is head
    with pytest.raises(ValueError, match="UnsharedHead"):
        UnsharedHead(head)
    with pytest.raises(ValueError, match="unshare_level_norms"):
        MergedHead(RetinaNetHead(16, 9, 5, 1, norm="bn"))


def test_bn_head_trains_on_one_image_whose_smallest_level_is_one_pixel():
    head = RetinaNetHead(16, 9, 5, 1, norm="bn", num_levels=2).train()
    cls, _ = head([torch.randn(1, 16, 4, 4), torch.randn(1, 16, 1, 1)])
    assert cls[1].shape == (1, 45, 1, 1) and torch.isfinite(cls[1]).all()
    p7 = next(m for m in head.cls_subnet if isinstance(m, LevelBatchNorm)).levels[1]
    assert p7.num_batches_tracked.item() == 0  # the running statistics normalised it, unchanged
