"""torch DataLoaders producing :class:`~retinaflow.data.batch.Batch`.

Which samples form each batch, with which augmentation seeds and padded shape, is decided by
:mod:`retinaflow.data.sampler` (the DALI loaders use the same); here worker processes decode, augment and
collate them. Training: an endless stream of batches that resumes exactly. Evaluation: each image exactly
once across ranks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from retinaflow.config import DataConfig
from retinaflow.data.batch import Batch
from retinaflow.data.coco import CocoDataset, Sample
from retinaflow.data.sampler import TrainBatchSampler, eval_batches, train_batches
from retinaflow.data.shapes import ShapePolicy
from retinaflow.data.transforms import EvalTransform, TrainTransform
from retinaflow.errors import ConfigError

log = logging.getLogger(__name__)


def collate(samples: list[Sample], pad_stride: int, policy: ShapePolicy | None = None) -> Batch:
    """Stack samples into a Batch: images zero-padded (bottom/right) to ``policy.pad_shape`` (default: a
    multiple of ``pad_stride``), boxes/labels padded to the largest count M (at least 1) with label -1.
    Samples without an image (corrupt, not replaced) are left out; their ids, and those passed over, go
    to ``Batch.skipped``."""
    skipped = tuple(i for s in samples for i in s.skipped)
    kept = [s for s in samples if s.image is not None]
    count = max([1] + [len(s.labels) for s in kept])
    if kept:  # the largest image, or the global batch's (DDP: every rank pads to the same bucket)
        height = max(max(int(s.image.shape[-2]), s.pad_at_least[0]) for s in kept if s.image is not None)
        width = max(max(int(s.image.shape[-1]), s.pad_at_least[1]) for s in kept if s.image is not None)
    else:
        height = width = pad_stride
    height, width = (policy or ShapePolicy((), pad_stride)).pad_shape(height, width)
    images = torch.zeros((len(kept), 3, height, width), dtype=torch.uint8)
    boxes = torch.zeros((len(kept), count, 4), dtype=torch.float32)
    labels = torch.full((len(kept), count), -1, dtype=torch.int64)
    sizes = torch.zeros((len(kept), 2), dtype=torch.int64)
    for i, s in enumerate(kept):
        assert s.image is not None
        h, w = s.image.shape[-2:]
        images[i, :, :h, :w] = s.image
        n = len(s.labels)
        boxes[i, :n] = s.boxes
        labels[i, :n] = s.labels
        sizes[i, 0], sizes[i, 1] = h, w
    return Batch(
        images=images,
        boxes=boxes,
        labels=labels,
        image_ids=torch.tensor([s.image_id for s in kept], dtype=torch.int64),
        scales=torch.tensor([s.scale for s in kept], dtype=torch.float32),
        sizes=sizes,
        skipped=skipped,
    )


class TrainLoader:
    """Endless iterator of training batches; ``iteration`` counts batches taken (from ``start_iteration``).

    Corrupt images skipped in workers are recorded on the dataset (``dataset.report()``) and in
    ``skipped_ids``.
    """

    def __init__(
        self,
        loader: DataLoader[Sample],
        dataset: CocoDataset,
        sampler: TrainBatchSampler,
        policy: ShapePolicy | None = None,
    ) -> None:
        self.loader, self.dataset, self.batch_sampler = loader, dataset, sampler
        self.policy = policy or ShapePolicy((), 1)
        self.iteration = sampler.start_iteration
        self.skipped_ids: set[int] = set()
        self._it: Iterator[Batch] | None = None

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch_of(self.iteration)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.iteration += 1
        _note_skipped(self.dataset, self.skipped_ids, batch)
        return batch

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._it = None


class EvalLoader:
    """One pass over this rank's share of an evaluation set per iteration; batches whose images were all
    corrupt are not yielded (their ids are still recorded, like in :class:`TrainLoader`)."""

    def __init__(
        self, loader: DataLoader[Sample], dataset: CocoDataset, policy: ShapePolicy | None = None
    ) -> None:
        self.loader, self.dataset = loader, dataset
        self.policy = policy or ShapePolicy((), 1)
        self.skipped_ids: set[int] = set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            _note_skipped(self.dataset, self.skipped_ids, batch)
            if len(batch):
                yield batch


def build_train_loader(
    data: DataConfig,
    batch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_iteration: int = 0,
    pin_memory: bool | None = None,
) -> tuple[TrainLoader, CocoDataset]:
    """Endless training batches of ``batch`` images for ``rank`` (augmented), and the dataset.

    ``start_iteration`` skips the batches a previous run already consumed (no images are loaded for
    them). ``pin_memory`` defaults to "an accelerator is present".
    """
    check_loader_args(data, batch, rank, world_size, start_iteration, train=True)
    assert data.images and data.annotations
    dataset = CocoDataset(data.images, data.annotations, TrainTransform(data), replace_corrupt=True)
    batch_sampler, policy = train_batches(dataset, data, batch, seed, rank, world_size, start_iteration)
    loader = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=data.workers,
        collate_fn=functools.partial(collate, pad_stride=data.pad_stride, policy=policy),
        pin_memory=_pin(pin_memory),
        persistent_workers=data.workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return TrainLoader(loader, dataset, batch_sampler, policy), dataset


def build_eval_loader(
    images: str | Path,
    annotations: str | Path,
    data: DataConfig,
    batch: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
) -> tuple[EvalLoader, CocoDataset]:
    """Batches of ``images`` resized to ``data.resize`` (cap ``data.max_size``), this rank's share only
    (in dataset order within each aspect-ratio group), and the dataset. A file listing no annotations is
    accepted (inference)."""
    check_loader_args(data, batch, rank, world_size)
    transform = EvalTransform(data.resize, data.max_size)
    dataset = CocoDataset(images, annotations, transform, replace_corrupt=False, require_annotations=False)
    batches, policy = eval_batches(dataset, data, batch, rank, world_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=data.workers,
        collate_fn=functools.partial(collate, pad_stride=data.pad_stride, policy=policy),
        pin_memory=_pin(pin_memory),
        persistent_workers=data.workers > 0,
    )
    return EvalLoader(loader, dataset, policy), dataset


def check_loader_args(
    data: DataConfig, batch: int, rank: int, world_size: int, start_iteration: int = 0, train: bool = False
) -> None:
    """The arguments both loaders (torch and DALI) check before reading anything; ConfigError if bad."""
    if train and (not data.images or not data.annotations):
        raise ConfigError("training needs data.images and data.annotations")
    if start_iteration < 0:
        raise ConfigError(f"start_iteration must be >= 0, got {start_iteration}")
    if batch <= 0:
        raise ConfigError(f"batch size must be positive, got {batch}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of {world_size}")
    if data.workers < 0:
        raise ConfigError(f"data.workers must be >= 0, got {data.workers}")
    if data.pad_stride <= 0:
        raise ConfigError(f"data.pad_stride must be positive, got {data.pad_stride}")


def _pin(pin_memory: bool | None) -> bool:
    return torch.accelerator.is_available() if pin_memory is None else pin_memory


def _note_skipped(dataset: CocoDataset, seen: set[int], batch: Batch) -> None:
    if batch.skipped:
        seen.update(batch.skipped)
        new = dataset.record_corrupt(batch.skipped)
        if new:
            log.warning("skipped corrupt image ids %s (%d so far)", new, dataset.report()["corrupt_images"])
