from __future__ import annotations

import pytest
import torch

from retinaflow.errors import ConfigError
from retinaflow.model.head import MergedHead, RetinaNetHead


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
    convs_in_tower = sum(isinstance(m, torch.nn.Conv2d) for m in merged.tower)
    assert convs_in_tower == convs  # one merged convolution per layer of the two subnets
    features = [torch.randn(2, 64, s, s + 3) for s in (16, 8, 1)]
    with torch.no_grad():
        want, got = head(features), merged(features)
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
