"""Anchor boxes per pyramid level, in the exact order of the flattened head outputs.

Layout (shared with the head, the loss and post-processing): for a level of stride ``s`` on an input of
``H x W`` pixels there are ``H_l * W_l`` locations (``H_l = ceil(H / s)``), location-major (row y, then
column x), and ``A = len(ratios) * len(scales)`` anchors per location, anchor-minor with
``a = ratio_index * len(scales) + scale_index``. The anchor at (y, x) is centred at
``((x + 0.5) * s, (y + 0.5) * s)``; its side is ``size_factor * s * scale`` and for ratio ``r = h / w``
it has ``w = side / sqrt(r)``, ``h = side * sqrt(r)``.
"""

from __future__ import annotations

import functools
import math

import torch

from retinaflow.config import AnchorConfig
from retinaflow.errors import ConfigError


def generate_anchors(
    cfg: AnchorConfig,
    image_hw: tuple[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Anchors of every level for an input of ``image_hw = (H, W)`` pixels.

    Returns one tensor per stride in ``cfg.strides``: ``(H_l * W_l * A, 4)`` float ``dtype`` on ``device``,
    x1y1x2y2 in input pixels. Results are cached per (anchor settings, size, device, dtype): treat the
    tensors as read-only.
    """
    height, width = (int(v) for v in image_hw)
    if height <= 0 or width <= 0:
        raise ConfigError(f"anchors need a positive image size, got {tuple(image_hw)}")
    if not cfg.strides or not cfg.ratios or not cfg.scales:
        raise ConfigError("anchors need at least one stride, one ratio and one scale")
    if min(cfg.strides) <= 0 or min(cfg.ratios) <= 0 or min(cfg.scales) <= 0 or cfg.size_factor <= 0:
        raise ConfigError(
            f"anchor strides, ratios, scales and size_factor must be positive, got {cfg.strides}, "
            f"{cfg.ratios}, {cfg.scales}, {cfg.size_factor}"
        )
    levels = _cached(
        tuple(int(s) for s in cfg.strides),
        tuple(float(r) for r in cfg.ratios),
        tuple(float(s) for s in cfg.scales),
        float(cfg.size_factor),
        height,
        width,
        torch.device(device) if device is not None else torch.device("cpu"),
        dtype,
    )
    return list(levels)


def base_anchors(
    stride: int, ratios: tuple[float, ...], scales: tuple[float, ...], size_factor: float
) -> torch.Tensor:
    """The ``A`` anchors of one location centred at (0, 0): ``(A, 4)`` float64 x1y1x2y2, ratios outer."""
    ratio = torch.tensor(ratios, dtype=torch.float64)
    side = size_factor * stride * torch.tensor(scales, dtype=torch.float64)
    widths = (side[None, :] / ratio.sqrt()[:, None]).reshape(-1)
    heights = (side[None, :] * ratio.sqrt()[:, None]).reshape(-1)
    return torch.stack([-widths, -heights, widths, heights], dim=1) / 2


@functools.lru_cache(maxsize=64)
def _cached(
    strides: tuple[int, ...],
    ratios: tuple[float, ...],
    scales: tuple[float, ...],
    size_factor: float,
    height: int,
    width: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    levels = []
    for stride in strides:  # a handful of levels; every location is computed at once
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        ys = (torch.arange(rows, dtype=torch.float64) + 0.5) * stride
        xs = (torch.arange(cols, dtype=torch.float64) + 0.5) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H_l*W_l, 1, 4), y-major
        anchors = centres + base_anchors(stride, ratios, scales, size_factor)[None]  # (H_l*W_l, A, 4)
        levels.append(anchors.reshape(-1, 4).to(device=device, dtype=dtype))
    return tuple(levels)
