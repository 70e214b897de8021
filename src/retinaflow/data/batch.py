"""The batch that the data loaders produce and the engine consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class Batch:
    """A padded batch of images and targets.

    images:    (B, 3, H, W) uint8 RGB, resized then zero-padded to a multiple of ``pad_stride``.
    boxes:     (B, M, 4) float32, x1y1x2y2 in resized-image pixels; rows past an image's count are 0.
    labels:    (B, M) int64, contiguous class index 0..C-1; -1 marks padding rows.
    image_ids: (B,) int64, COCO image ids.
    scales:    (B,) float32, resized size / original size (divide boxes by it to get original pixels).
    sizes:     (B, 2) int64, (height, width) of each resized image before padding.
    skipped:   COCO ids of corrupt images the loader skipped while assembling this batch (a plain
               tuple so that the count survives DataLoader worker processes; empty almost always).
    """

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    scales: torch.Tensor
    sizes: torch.Tensor
    skipped: tuple[int, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(
            **{
                f.name: _apply(getattr(self, f.name), "to", device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: _apply(getattr(self, f.name), "pin_memory") for f in fields(self)})

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _apply(value: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Calls ``method`` on tensor fields; other fields (``skipped``) pass through unchanged."""
    return getattr(value, method)(*args, **kwargs) if isinstance(value, torch.Tensor) else value
