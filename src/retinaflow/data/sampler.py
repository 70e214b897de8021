"""The order of training and evaluation batches: which samples, with which augmentation seeds, padded to
which shape. Shared by the torch and the DALI loaders, so both see the same batches.

Training: an endless stream of batches. A ``DistributedSampler`` (shuffled, ``set_epoch`` every epoch)
gives each rank its share of every epoch; the per-rank index stream is cut into batches continuously
across epochs, so batch ``k`` of a run is a pure function of (seed, rank, world size, k). Each sample also
gets its own augmentation seed from (seed, epoch, index) (:func:`sample_seeds`). Resuming at iteration
``k`` therefore sees exactly the data an uninterrupted run would have seen, whatever the number of workers.

With ``data.shapes == "buckets"`` each batch holds images of one aspect-ratio group whose drawn jitter
falls in one size level, and is padded to that level's canonical shape (see :mod:`retinaflow.data.shapes`);
grouping is a pure function of the same stream, so resuming stays exact.

Evaluation: each image exactly once across ranks, in the batches of a one-rank evaluation.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from retinaflow.config import DataConfig
from retinaflow.data.coco import CocoDataset
from retinaflow.data.shapes import ShapePolicy, aspect_groups, build_policy, shorter_levels
from retinaflow.data.transforms import jitter_shorter, resize_scale, resized_size

log = logging.getLogger(__name__)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 values: a bijection that mixes every input bit into every output."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Augmentation seeds (uint64, 63-bit, well mixed) of dataset items ``indices`` (int array) in
    ``epoch``: a hash of (seed, epoch, index), vectorised, as resuming replays a whole run's order."""
    with np.errstate(over="ignore"):
        head = _splitmix64(_splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
        return _splitmix64(head ^ indices.astype(np.uint64)) >> np.uint64(1)


Item = tuple[int, int]  # (dataset index, augmentation seed)


class TrainBatchSampler(Sampler[list[tuple[int, ...]]]):
    """Endless batches of (dataset index, augmentation seed) for one rank, starting at ``start_iteration``.

    group_of: optional group keys (int array) of items from their dataset indices and augmentation seeds
    (arrays): the aspect-ratio group and the size level the drawn jitter falls in (:func:`train_batches`).
    Then every batch holds one group only: the epoch's global permutation (the one ``sampler`` shards) is
    read in order and each item waits in its group's buffer until that buffer holds ``batch x world size``
    (torchvision's GroupedBatchSampler, endless, keyed by drawn size too); this rank takes every
    world-size-th item of it. So at every step all ranks train on the same group (similar padded shapes:
    none waits for a larger one at the gradient all-reduce), and together on exactly the batch one GPU
    would draw with the global batch. Resuming replays the buffering from iteration 0 without loading
    anything (vectorised index and seed arithmetic), so batch k is still a pure function of (seed, rank,
    world size, k).

    pad_hint: with groups and several ranks, maps the global batch's (index, seed) items to the resized
    (height, width) of its largest image; each item then carries it, (index, seed, height, width), and
    every rank pads to the bucket of the global batch, as one GPU would (same shapes, same anchors, same
    loss). Items are (index, seed) otherwise.
    """

    def __init__(
        self,
        sampler: DistributedSampler[int],
        batch: int,
        seed: int,
        start_iteration: int = 0,
        group_of: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        pad_hint: Callable[[list[tuple[int, int]]], tuple[int, int]] | None = None,
    ):
        self.sampler, self.batch, self.seed, self.start_iteration = sampler, batch, seed, start_iteration
        self.group_of, self.pad_hint = group_of, pad_hint
        self.per_epoch = len(sampler)

    def epoch_of(self, iteration: int) -> int:
        """The epoch the first sample of batch ``iteration`` belongs to (approximate with groups)."""
        return iteration * self.batch // self.per_epoch

    def _epochs(
        self, sampler: DistributedSampler[int], epoch: int, offset: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each epoch's dataset indices (int64) of ``sampler`` from position ``offset`` of ``epoch``, and
        their augmentation seeds (uint64), endless."""
        while True:
            sampler.set_epoch(epoch)
            indices = np.asarray(list(sampler)[offset:], dtype=np.int64)
            yield indices, sample_seeds(self.seed, epoch, indices)
            epoch, offset = epoch + 1, 0

    def _grouped(self) -> Iterator[tuple[list[Item], list[Item]]]:
        """(this rank's (index, seed) items, the whole global batch's) per step."""
        rank, world = self.sampler.rank, self.sampler.num_replicas
        # every rank reads the unsharded permutation (the one ``self.sampler`` deals out)
        everyone: DistributedSampler[int] = DistributedSampler(
            self.sampler.dataset, num_replicas=1, rank=0, shuffle=self.sampler.shuffle, seed=self.sampler.seed
        )
        buffers: dict[int, list[Item]] = {}
        assert self.group_of is not None
        for indices, seeds in self._epochs(everyone, 0, 0):
            keys = self.group_of(indices, seeds)
            for index, seed, group in zip(indices.tolist(), seeds.tolist(), keys.tolist(), strict=True):
                buffer = buffers.setdefault(group, [])
                buffer.append((index, seed))
                if len(buffer) == self.batch * world:
                    yield buffer[rank::world], buffer[:]
                    buffer.clear()

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        if self.group_of is None:
            epoch, offset = divmod(self.start_iteration * self.batch, self.per_epoch)
            stream: Iterator[tuple[int, ...]] = (
                (index, seed)
                for indices, seeds in self._epochs(self.sampler, epoch, offset)
                for index, seed in zip(indices.tolist(), seeds.tolist(), strict=True)
            )
            yield from iter(lambda: list(itertools.islice(stream, self.batch)), [])
            return
        for mine, everyone in itertools.islice(self._grouped(), self.start_iteration, None):
            if self.pad_hint is None or self.sampler.num_replicas == 1:
                yield list(mine)
            else:  # every rank pads to the global batch's bucket: the shapes one GPU would see
                height, width = self.pad_hint(everyone)
                yield [(*item, height, width) for item in mine]


def train_batches(
    dataset: CocoDataset,
    data: DataConfig,
    batch: int,
    seed: int,
    rank: int,
    world_size: int,
    start_iteration: int,
) -> tuple[TrainBatchSampler, ShapePolicy]:
    """The batch sampler (this rank's share; under the bucket policy grouped by aspect ratio and jitter
    level) and the shape policy of a training set: shared by the torch and DALI loaders, so both see the
    same batches."""
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
    )
    sizes = dataset.image_sizes()
    groups = aspect_groups(sizes, data.aspect_groups if data.shapes == "buckets" else 1)
    levels = shorter_levels(data.jitter[0], data.jitter[1], data.bucket_levels)
    policy = build_policy(data, sizes, groups, levels, data.pad_stride)

    def group_of(indices: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Aspect group and jitter level: a batch of one group pads to the bucket of its level, not to
        the largest jitter any of its images drew (COCO's sizes, default jitter: 18 % fewer padded
        pixels than grouping by aspect alone; docs/PERFORMANCE.md)."""
        level = np.searchsorted(levels, jitter_shorter(seeds, data.jitter), side="left")
        return groups[indices] * len(levels) + level

    def largest(items: list[tuple[int, int]]) -> tuple[int, int]:
        """Resized (height, width) of the largest image of a batch, each side separately."""
        resized = [_resized(sizes, data, index, seed) for index, seed in items]
        return max(r[0] for r in resized), max(r[1] for r in resized)

    grouped = data.shapes == "buckets" and (len(np.unique(groups)) > 1 or len(levels) > 1)
    batches = TrainBatchSampler(sampler, batch, seed, start_iteration, group_of if grouped else None, largest)
    pad = padding(batches, policy, sizes, data) if rank == 0 else None
    if pad is not None and pad.padded_mpx > 0:
        log.info(
            "padding: %.0f %% of a training batch's pixels (%.2f padded Mpx per image of %.2f Mpx)",
            100 * (1 - pad.image_mpx / pad.padded_mpx),
            pad.padded_mpx,
            pad.image_mpx,
        )
    return batches, policy


@dataclass(frozen=True)
class Padding:
    """Mean padded and own megapixels per image of some training batches, and their distinct shapes."""

    padded_mpx: float
    image_mpx: float
    shapes: int


def padding(
    batches: TrainBatchSampler, policy: ShapePolicy, sizes: np.ndarray, data: DataConfig, count: int = 200
) -> Padding:
    """What the first ``count`` batches of ``batches`` carry (from its start iteration; the sampler's
    own iteration is not disturbed): images resized as their seeds draw, padded as ``loader.collate``
    pads them. sizes: (N, 2) (height, width) of the dataset's originals."""
    padded = own = images = 0
    shapes = set()
    for items in itertools.islice(batches, count):
        resized = [_resized(sizes, data, index, seed) for index, seed, *_ in items]
        at_least = items[0][2:] if len(items[0]) == 4 else (0, 0)  # the global batch's, under DDP
        height = max([r[0] for r in resized] + [int(at_least[0])])
        width = max([r[1] for r in resized] + [int(at_least[1])])
        shape = policy.pad_shape(height, width)
        shapes.add(shape)
        padded += shape[0] * shape[1] * len(resized)
        own += sum(h * w for h, w in resized)
        images += len(resized)
    images = max(images, 1)
    return Padding(padded / images / 1e6, own / images / 1e6, len(shapes))


def _resized(sizes: np.ndarray, data: DataConfig, index: int, seed: int) -> tuple[int, int]:
    """(height, width) of image ``index`` (sizes: (N, 2) of the originals) resized as its seed draws."""
    h, w = (int(v) for v in sizes[index])
    return resized_size(h, w, resize_scale(h, w, jitter_shorter(seed, data.jitter), data.max_size))


def eval_batches(
    dataset: CocoDataset, data: DataConfig, batch: int, rank: int, world_size: int
) -> tuple[list[list[int]], ShapePolicy]:
    """This rank's evaluation batches and the shape policy at ``data.resize``.

    The batches are those of a one-rank evaluation (dataset order; under the bucket policy each batch
    from one aspect-ratio group, groups in turn), dealt out round-robin: rank r gets batches r, r + world,
    ... So every image is run in the same batch, at the same padded shape, as on one rank, and sharded
    evaluation gives exactly the detections of a single-rank one."""
    sizes = dataset.image_sizes()
    groups = aspect_groups(sizes, data.aspect_groups if data.shapes == "buckets" else 1)
    policy = build_policy(data, sizes, groups, [data.resize], data.pad_stride)
    batches: list[list[int]] = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g).tolist()
        batches.extend(members[i : i + batch] for i in range(0, len(members), batch))
    return batches[rank::world_size], policy
