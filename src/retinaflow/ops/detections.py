"""The fixed-size detections that post-processing returns (the interface of model, infer and export)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Detections:
    """Detections of a batch, padded to ``D = max_det`` rows per image.

    scores:  (B, D) float32, descending within an image; padding rows are 0.
    boxes:   (B, D, 4) float32, x1y1x2y2 in resized-image pixels; padding rows are 0.
    classes: (B, D) int64, contiguous class index 0..C-1; padding rows are -1.
    counts:  (B,) int64, number of real rows of each image (rows ``[:counts[i]]`` are detections).

    The shapes never depend on the data, so producing them needs no host synchronisation.
    """

    scores: torch.Tensor
    boxes: torch.Tensor
    classes: torch.Tensor
    counts: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Detections:
        return Detections(
            self.scores.to(device, non_blocking=non_blocking),
            self.boxes.to(device, non_blocking=non_blocking),
            self.classes.to(device, non_blocking=non_blocking),
            self.counts.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])
