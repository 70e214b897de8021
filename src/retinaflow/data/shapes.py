"""Shape policy: a small, known set of padded batch shapes, and when autotuning convolutions pays off.

Images of a batch are padded to a common (H, W). Padding to "a multiple of ``pad_stride``" lets every
new mix of sizes and jitter make a new shape: on real data that is dozens of shapes, and with
``cudnn.benchmark`` each one re-tunes every convolution. Here batches instead take the smallest of a few
canonical shapes (*buckets*) that holds all their images.

Buckets come from the dataset itself (image sizes listed in the COCO file), so no image is ever cut:
images are split into ``aspect_groups`` aspect-ratio groups (log-spaced between 1:2 and 2:1; 2 groups =
portrait / landscape) and, per group, one bucket per *level* of the shorter side (``bucket_levels``
evenly spaced up to the jitter maximum when training, the eval ``resize`` otherwise): the bucket is the
largest resized image of the group at that level, rounded up to ``pad_stride``. A training batch is drawn
from one group and one level (its images' drawn shorter sides fall in the same level; see
``sampler.train_batches``), so it takes its level's bucket, not the one of the largest jitter any of its
images drew; batches take at most ``aspect_groups * bucket_levels`` shapes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from retinaflow.config import DataConfig
from retinaflow.data.transforms import resize_scale
from retinaflow.errors import ConfigError

log = logging.getLogger(__name__)

SHAPE_POLICIES = ("buckets", "stride")
CUDNN_SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class ShapePolicy:
    """Padded batch shapes: the smallest bucket (area) that holds (h, w), else a multiple of ``stride``.

    buckets: ((H, W), ...) canonical padded shapes, multiples of ``stride``; empty = stride padding only.
    """

    buckets: tuple[tuple[int, int], ...]
    stride: int

    def pad_shape(self, height: int, width: int) -> tuple[int, int]:
        """Padded (H, W) for a batch whose largest image is ``height`` x ``width`` (each maximum taken
        separately)."""
        fitting = [b for b in self.buckets if b[0] >= height and b[1] >= width]
        if fitting:
            return min(fitting, key=lambda b: (b[0] * b[1], b))
        if self.buckets:  # the COCO file understated an image's size: still correct, one more shape
            log.debug("no bucket holds %dx%d; padding to a multiple of %d", height, width, self.stride)
        return _ceil(height, self.stride), _ceil(width, self.stride)

    @property
    def bounded(self) -> bool:
        """True when the shapes are a known, small set (buckets), i.e. autotuning each one pays off."""
        return bool(self.buckets)


def aspect_groups(sizes: np.ndarray, groups: int) -> np.ndarray:
    """Group id (0..groups-1) of each image from sizes (N, 2) int (height, width) of the originals.

    Edges are log-spaced in width / height between 1/2 and 2 (groups=2: portrait 0, landscape-or-square 1);
    ratios beyond them join the end groups. groups <= 1 puts every image in group 0.
    """
    if groups <= 1 or len(sizes) == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    edges = 2.0 ** np.linspace(-1.0, 1.0, groups + 1)[1:-1]
    ratio = sizes[:, 1].astype(np.float64) / sizes[:, 0].astype(np.float64)
    return np.searchsorted(edges, ratio, side="right").astype(np.int64)


def shorter_levels(lo: int, hi: int, levels: int) -> list[int]:
    """``levels`` shorter-side values evenly spaced in (lo, hi], the last one ``hi`` (one level: [hi])."""
    n = max(1, levels)
    return sorted({round(lo + (hi - lo) * (k + 1) / n) for k in range(n)})


def build_policy(
    data: DataConfig, sizes: np.ndarray, groups: np.ndarray, levels: list[int], pad_stride: int
) -> ShapePolicy:
    """Policy for a dataset: sizes (N, 2) (height, width) of the originals, groups (N,) their group ids,
    levels the shorter sides the resize can reach (each image is resized with ``data.max_size``)."""
    check_shape_config(data)
    if data.shapes == "stride" or len(sizes) == 0:
        return ShapePolicy((), pad_stride)
    buckets: set[tuple[int, int]] = set()
    for g in np.unique(groups):
        distinct = {(int(h), int(w)) for h, w in sizes[groups == g]}
        for shorter in levels:
            resized = [_resized(h, w, shorter, data.max_size) for h, w in distinct]
            height, width = max(r[0] for r in resized), max(r[1] for r in resized)
            buckets.add((_ceil(height, pad_stride), _ceil(width, pad_stride)))
    policy = ShapePolicy(tuple(sorted(buckets)), pad_stride)
    log.info("shape policy: %d padded shapes %s", len(policy.buckets), list(policy.buckets))
    return policy


def use_cudnn_benchmark(setting: str, policy: ShapePolicy | None) -> bool:
    """Whether to let cuDNN autotune: "on", "off", or "auto" = on only when the shapes are bounded."""
    if setting not in CUDNN_SETTINGS:
        raise ConfigError(f"cudnn_benchmark must be one of {', '.join(CUDNN_SETTINGS)}, got {setting!r}")
    if setting == "auto":
        return policy is not None and policy.bounded
    return setting == "on"


def check_shape_config(data: DataConfig) -> None:
    if data.shapes not in SHAPE_POLICIES:
        raise ConfigError(f"data.shapes must be one of {', '.join(SHAPE_POLICIES)}, got {data.shapes!r}")
    if data.aspect_groups < 1 or data.bucket_levels < 1:
        raise ConfigError(
            f"data.aspect_groups and data.bucket_levels must be >= 1, got "
            f"{data.aspect_groups} and {data.bucket_levels}"
        )


def _resized(height: int, width: int, shorter: int, max_size: int) -> tuple[int, int]:
    """(h, w) after ``transforms.resize`` at this shorter side: the same arithmetic, so buckets fit."""
    scale = resize_scale(height, width, shorter, max_size)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _ceil(value: int, stride: int) -> int:
    return math.ceil(value / stride) * stride
