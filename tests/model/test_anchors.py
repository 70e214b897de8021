from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinaflow.config import AnchorConfig
from retinaflow.errors import ConfigError
from retinaflow.model.anchors import generate_anchors


def test_count_per_level_uses_ceil() -> None:
    cfg = AnchorConfig()
    for hw in [(128, 256), (100, 130)]:
        levels = generate_anchors(cfg, hw, "cpu", torch.float32)
        assert len(levels) == 5
        for stride, anchors in zip(cfg.strides, levels, strict=True):
            expected = math.ceil(hw[0] / stride) * math.ceil(hw[1] / stride) * 9
            assert anchors.shape == (expected, 4)


def test_layout_centres_sizes_and_ratios() -> None:
    cfg = AnchorConfig(ratios=(0.5, 1.0, 2.0), scales=(1.0, 1.5), size_factor=4.0)
    height, width = 128, 384
    for stride, anchors in zip(cfg.strides, generate_anchors(cfg, (height, width)), strict=True):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        grid = anchors.view(rows, cols, 6, 4)  # location-major (y, x), anchor-minor
        cx = (grid[..., 0] + grid[..., 2]) / 2
        cy = (grid[..., 1] + grid[..., 3]) / 2
        xs = (torch.arange(cols) + 0.5) * stride
        ys = (torch.arange(rows) + 0.5) * stride
        torch.testing.assert_close(cx, xs[None, :, None].expand_as(cx))
        torch.testing.assert_close(cy, ys[:, None, None].expand_as(cy))
        w = grid[..., 2] - grid[..., 0]
        h = grid[..., 3] - grid[..., 1]
        for ri, ratio in enumerate(cfg.ratios):
            for si, scale in enumerate(cfg.scales):
                a = ri * len(cfg.scales) + si
                side = cfg.size_factor * stride * scale
                torch.testing.assert_close(w[..., a], torch.full_like(w[..., a], side / math.sqrt(ratio)))
                torch.testing.assert_close(h[..., a], torch.full_like(h[..., a], side * math.sqrt(ratio)))


def test_first_anchor_values() -> None:
    cfg = AnchorConfig(ratios=(1.0,), scales=(1.0,), size_factor=4.0)
    p3 = generate_anchors(cfg, (128, 128))[0]
    # location (0, 0) centred at (4, 4), side 32; location (0, 1) centred at (12, 4); (1, 0) at (4, 12)
    torch.testing.assert_close(p3[0], torch.tensor([-12.0, -12.0, 20.0, 20.0]))
    torch.testing.assert_close(p3[1], torch.tensor([-4.0, -12.0, 28.0, 20.0]))
    torch.testing.assert_close(p3[16], torch.tensor([-12.0, -4.0, 20.0, 28.0]))


def test_agrees_with_torchvision_anchor_generator_after_recentering() -> None:
    cfg = AnchorConfig()
    height, width = 256, 384
    ours = generate_anchors(cfg, (height, width))
    sizes = tuple(tuple(cfg.size_factor * s * k for k in cfg.scales) for s in cfg.strides)
    generator = AnchorGenerator(sizes=sizes, aspect_ratios=(cfg.ratios,) * len(cfg.strides))
    images = ImageList(torch.zeros(1, 3, height, width), [(height, width)])
    feats = [torch.zeros(1, 1, math.ceil(height / s), math.ceil(width / s)) for s in cfg.strides]
    theirs = generator(images, feats)[0]
    offset = torch.cat([torch.full((a.shape[0], 1), s / 2) for a, s in zip(ours, cfg.strides, strict=True)])
    # torchvision puts centres at x * stride (not + stride/2) and rounds the base anchors to integers
    torch.testing.assert_close(theirs + offset, torch.cat(ours), atol=0.5 + 1e-4, rtol=0)


def test_cache_device_and_dtype() -> None:
    cfg = AnchorConfig()
    a = generate_anchors(cfg, (128, 128), torch.device("cpu"), torch.float32)
    b = generate_anchors(cfg, (128, 128), "cpu", torch.float32)
    assert all(x is y for x, y in zip(a, b, strict=True))
    c = generate_anchors(cfg, (128, 128), "cpu", torch.float64)
    assert c[0].dtype == torch.float64 and c[0].device.type == "cpu"
    torch.testing.assert_close(c[0].float(), a[0])
    other = generate_anchors(AnchorConfig(size_factor=8.0), (128, 128), "cpu", torch.float32)
    torch.testing.assert_close(other[0][0], 2 * a[0][0] - 4)  # centre (4, 4), twice the size


@pytest.mark.parametrize(
    ("cfg", "hw"),
    [
        (AnchorConfig(), (0, 128)),
        (AnchorConfig(ratios=()), (128, 128)),
        (AnchorConfig(scales=(1.0, -1.0)), (128, 128)),
    ],
)
def test_bad_settings_raise(cfg: AnchorConfig, hw: tuple[int, int]) -> None:
    with pytest.raises(ConfigError):
        generate_anchors(cfg, hw)
