"""Image + box transforms on uint8 CHW tensors (torchvision.transforms.v2 functional ops).

Every random choice is a function of the sample's seed, which the loader derives from (seed, epoch,
sample), so augmentation depends on nothing else — not on worker count or on where a run resumed.

Boxes are (N, 4) float32 x1y1x2y2 in pixels of the image they travel with; a resize multiplies them by
the one scale factor it also returns (Batch.scales), so dividing by it restores original pixels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from retinaflow.config import DataConfig
from retinaflow.errors import ConfigError


def resize_scale(height: int, width: int, shorter: int, max_size: int) -> float:
    """Factor that brings the shorter side to ``shorter`` unless the longer would pass ``max_size``
    (then the longer side becomes ``max_size``); ``max_size <= 0`` means no cap."""
    scale = shorter / min(height, width)
    if max_size > 0 and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return scale


def resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(round(H*s), round(W*s)), at least 1: the size :func:`resize` produces (the DALI loader's too)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


Size = int | torch.Tensor  # one value for every box, or (N,) values, one per box (a batch's boxes at once)


def clip_boxes(boxes: torch.Tensor, height: Size, width: Size) -> torch.Tensor:
    """Boxes (N, 4) x1y1x2y2 clipped to a ``height`` x ``width`` image (a few ops whatever N: loaders call
    this per sample, the DALI loader once per batch)."""
    return torch.minimum(boxes.clamp(min=0), _per_box(boxes, (width, height, width, height)))


def resize_boxes(boxes: torch.Tensor, scale: float | torch.Tensor, height: Size, width: Size) -> torch.Tensor:
    """Boxes (N, 4) x1y1x2y2 multiplied by ``scale`` (a float or (N,)) and clipped to the resized
    ``height`` x ``width``."""
    factor = scale[:, None].to(boxes.dtype) if isinstance(scale, torch.Tensor) else scale
    return clip_boxes(boxes * factor, height, width)


def resize(image: torch.Tensor, boxes: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image (3, H, W) uint8 by ``scale`` (antialiased) to (3, round(H*s), round(W*s)); boxes (N, 4)
    are multiplied by ``scale`` and clipped to the new image."""
    h, w = image.shape[-2:]
    new_h, new_w = resized_size(h, w, scale)
    if (new_h, new_w) != (h, w):
        image = F.resize(image, [new_h, new_w], antialias=True)
    return image, resize_boxes(boxes, scale, new_h, new_w)


def hflip_boxes(boxes: torch.Tensor, height: Size, width: Size) -> torch.Tensor:
    """Boxes (N, 4) x1y1x2y2 of a ``height`` x ``width`` image mirrored left–right (x1' = W - x2,
    x2' = W - x1: torchvision's ``horizontal_flip`` of XYXY boxes, without its tv_tensors wrapping)."""
    w = width.to(boxes.dtype) if isinstance(width, torch.Tensor) else width
    return torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)


def _per_box(boxes: torch.Tensor, values: tuple[Size, ...]) -> torch.Tensor:
    """(4,) or (N, 4) in boxes' dtype from four ints or four (N,) tensors."""
    if any(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([torch.as_tensor(v) for v in values], -1).to(boxes.dtype)
    return torch.tensor(values, dtype=boxes.dtype)


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror image (3, H, W) and boxes (N, 4) x1y1x2y2 left–right."""
    h, w = image.shape[-2:]
    return F.horizontal_flip(image), hflip_boxes(boxes, h, w)


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


@overload
def jitter_shorter(seed: int, jitter: tuple[int, int]) -> int: ...
@overload
def jitter_shorter(seed: np.ndarray, jitter: tuple[int, int]) -> np.ndarray: ...
def jitter_shorter(seed: int | np.ndarray, jitter: tuple[int, int]) -> int | np.ndarray:
    """Shorter side in [lo, hi] of the sample(s) of these seeds (63-bit, well mixed: uniform up to a
    bias below 2^-50); int for an int, an int64 array for a uint64 array."""
    lo, hi = jitter
    if isinstance(seed, np.ndarray):
        return lo + (seed % np.uint64(hi - lo + 1)).astype(np.int64)
    return lo + seed % (hi - lo + 1)


@dataclass(frozen=True)
class TrainDraw:
    """One sample's augmentation: shorter side, flip, and (brightness, contrast, saturation) factors."""

    shorter: int
    flip: bool
    colour: tuple[float, float, float] | None


class TrainTransform:
    """Multi-scale resize (shorter side uniform in ``jitter``, longer side capped by ``max_size``),
    horizontal flip with probability ``flip`` and colour jitter (brightness, contrast, saturation factors
    uniform in 1 ± ``color_jitter``; the DALI loader applies the same arithmetic to whole batches on the
    GPU, :func:`colour_jitter_batch`)."""

    def __init__(self, cfg: DataConfig) -> None:
        lo, hi = cfg.jitter
        if not 0 < lo <= hi:
            raise ConfigError(f"data.jitter must be (min, max) with 0 < min <= max, got {cfg.jitter}")
        if not 0 <= cfg.flip <= 1:
            raise ConfigError(f"data.flip must be a probability, got {cfg.flip}")
        if not 0 <= cfg.color_jitter < 1:
            raise ConfigError(f"data.color_jitter must be in [0, 1), got {cfg.color_jitter}")
        self.jitter, self.max_size = (lo, hi), cfg.max_size
        self.flip, self.color_jitter = cfg.flip, cfg.color_jitter

    def draw(self, seed: int | None = None) -> TrainDraw:
        """The random choices for the sample of this seed (None: unseeded); the DALI loader draws here too.

        The shorter side is :func:`jitter_shorter` of the seed (arithmetic: the sampler groups a whole
        run's samples by it, sampler.train_batches); flip and colour come from a generator seeded with it.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        lo, hi = self.jitter
        shorter = int(torch.randint(lo, hi + 1, ())) if seed is None else jitter_shorter(seed, self.jitter)
        flip = float(torch.rand((), generator=generator)) < self.flip
        colour = None
        if self.color_jitter > 0:
            cj = self.color_jitter
            colour = (
                _uniform(generator, 1 - cj, 1 + cj),
                _uniform(generator, 1 - cj, 1 + cj),
                _uniform(generator, 1 - cj, 1 + cj),
            )
        return TrainDraw(shorter, flip, colour)

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """image (3, H, W) uint8, boxes (N, 4) float32 x1y1x2y2 → transformed image, boxes, scale."""
        h, w = image.shape[-2:]
        d = self.draw(seed)
        scale = resize_scale(h, w, d.shorter, self.max_size)
        image, boxes = resize(image, boxes, scale)
        if d.flip:
            image, boxes = hflip(image, boxes)
        if d.colour is not None:
            brightness, contrast, saturation = d.colour
            image = F.adjust_brightness(image, brightness)
            image = F.adjust_contrast(image, contrast)
            image = F.adjust_saturation(image, saturation)
        return image, boxes, scale


class EvalTransform:
    """Deterministic resize: shorter side to ``resize``, longer side capped by ``max_size``."""

    def __init__(self, resize: int, max_size: int) -> None:
        if resize <= 0:
            raise ConfigError(f"data.resize must be positive, got {resize}")
        self.resize, self.max_size = resize, max_size

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """image (3, H, W) uint8, boxes (N, 4) float32 x1y1x2y2 → resized image, boxes, scale."""
        h, w = image.shape[-2:]
        scale = resize_scale(h, w, self.resize, self.max_size)
        image, boxes = resize(image, boxes, scale)
        return image, boxes, scale


def colour_jitter_batch(images: torch.Tensor, sizes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` → ``adjust_contrast`` → ``adjust_saturation`` on a padded batch.

    images:  (B, 3, H, W) uint8 RGB, each image in its top-left ``sizes[i]`` corner, zeros elsewhere;
    sizes:   (B, 2) int (h, w) of each image (host or device);
    factors: (B, 3) float (brightness, contrast, saturation) per image.
    Returns (B, 3, H, W) uint8 channels_last with the padding still zero: ``retinaflow::colour_jitter``,
    two fused kernels on the GPU (:func:`retinaflow.ops.colour.colour_jitter`).
    """
    from retinaflow.ops.colour import colour_jitter

    return colour_jitter(images, sizes, factors)
