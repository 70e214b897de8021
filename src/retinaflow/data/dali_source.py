"""The DALI loaders' host side: what each batch holds, and the files fed to the pipeline.

:class:`Plan` is one sample (dataset index and its augmentation draws); :func:`train_plans` makes them from
the training sampler. :class:`BatchSource` is the pipeline's ``fn.external_source``: a producer thread
reads each batch's files, passes over corrupt ones as the torch path does, and computes the batch's boxes
with the torch path's arithmetic. After DALI failed on a file the source's check let through,
:func:`restarted` finds it by a CPU decode and continues at the same batch. Plain Python: no DALI import.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retinaflow.data.batch import Batch
from retinaflow.data.coco import CocoDataset
from retinaflow.data.images import decode_file, encoded_problem
from retinaflow.data.sampler import TrainBatchSampler
from retinaflow.data.shapes import ShapePolicy
from retinaflow.data.transforms import (
    TrainTransform,
    clip_boxes,
    hflip_boxes,
    resize_boxes,
    resize_scale,
    resized_size,
)
from retinaflow.errors import DataError

log = logging.getLogger(__name__)

_END = object()  # BatchSource: the plans ran out


@dataclass(frozen=True)
class Plan:
    """One sample of a batch: dataset index, shorter side, flip, (brightness, contrast, saturation), and
    the (H, W) its batch is padded to at least (the DDP global batch's hint; see ``TrainBatchSampler``)."""

    index: int
    shorter: int
    flip: bool
    colour: tuple[float, float, float]
    pad_at_least: tuple[int, int] = (0, 0)


class BatchSource:
    """``fn.external_source`` callback: each call returns the next plan list's pipeline inputs (encoded
    files, sizes, flips, bucket shape) and queues the host-side targets and (B, 3) colour factors (None
    without colour jitter), which :meth:`pop` hands back in the same order as the pipeline's outputs.

    DALI calls the source on the thread that runs the pipeline, between iterations; there, reading the
    files and computing the targets (~0.1 ms an image, 9,688 img/s alone on the H100 machine) ran in
    series with everything else. A producer thread prepares the next ``ahead`` batches' inputs instead
    (file reads and torch ops release the GIL), in the plans' order; a failure there is raised from the
    call that would have returned its batch. :meth:`close` stops it.

    Corrupt files (known to the dataset, or failing :func:`encoded_problem` when read) are passed over:
    with ``replace_corrupt`` the next image of the dataset takes the sample's place (its augmentation
    kept), as ``CocoDataset.__getitem__`` does; without, the sample is left out, and a batch left empty
    is not sent at all. Their ids go to the batch's ``skipped`` and to ``skipped_ids``. ``unconsumed``
    holds the plans of every batch prepared but not yet popped, oldest first: what a new source must
    prepare again after the pipeline failed (:func:`restarted`).
    """

    def __init__(
        self,
        dataset: CocoDataset,
        plans: Iterator[list[Plan]],
        policy: ShapePolicy,
        max_size: int,
        colour: bool,
        replace_corrupt: bool = True,
        skipped_ids: set[int] | None = None,
        ahead: int = 3,
    ) -> None:
        self.dataset, self.plans, self.policy, self.max_size = dataset, plans, policy, max_size
        self.colour, self.replace_corrupt = colour, replace_corrupt
        self.skipped_ids = skipped_ids if skipped_ids is not None else set()
        self.sizes, self.ids = dataset.image_sizes(), dataset.image_ids
        self._paths: dict[int, str] = {}
        self.pending: collections.deque[tuple[Batch, torch.Tensor | None]] = collections.deque()
        self.unconsumed: collections.deque[list[Plan]] = collections.deque()
        self._ready: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="dali-batch-source", daemon=True)
        self._thread.start()

    def __call__(self) -> tuple[list[Any], ...]:
        item = self._ready.get()
        if item is _END:
            self._ready.put(_END)  # every later call ends too (StopIteration ends the pipeline's epoch)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        inputs, targets = item
        self.pending.append(targets)
        return inputs

    def close(self) -> None:
        """Stop the producer thread (it may be waiting for room in the queue) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._ready.get_nowait()
            self._thread.join(timeout=0.05)

    def _produce(self) -> None:
        try:
            for plans in self.plans:
                inputs = self._inputs(plans)
                if inputs is None:  # every sample corrupt (evaluation): no batch
                    continue
                self.unconsumed.append(plans)
                if not self._put(inputs):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the pipeline's thread, raised there
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._ready.put(item, timeout=0.1)
                return True
        return False

    def _inputs(self, plans: list[Plan]) -> tuple[tuple[Any, ...], tuple[Batch, torch.Tensor | None]] | None:
        """The pipeline's inputs: the encoded files (a list: their lengths differ), then the resized
        widths, heights, flips and pad shapes each as one array of the batch (DALI converts an array in
        one call, a list element by element, on the thread that runs the pipeline). None when no sample
        is left (every one corrupt, none replaced)."""
        files, kept, passed = [], [], []
        for plan in plans:
            found, data, over = self._readable(plan)
            passed += over
            if data is not None:
                kept.append(found)
                files.append(np.frombuffer(data, dtype=np.uint8))
        self.skipped_ids.update(passed)
        if not kept:
            return None
        batch, resized = self._targets(kept)
        batch.skipped = tuple(passed)
        sizes = np.asarray(resized, dtype=np.int32).reshape(-1, 2)
        rx, ry = sizes[:, 1].astype(np.float32), sizes[:, 0].astype(np.float32)
        flips = np.asarray([p.flip for p in kept], dtype=np.int32)
        height = max([h for h, _ in resized] + [p.pad_at_least[0] for p in kept])
        width = max([w for _, w in resized] + [p.pad_at_least[1] for p in kept])
        shapes = np.tile(np.asarray(self.policy.pad_shape(height, width), dtype=np.int32), (len(kept), 1))
        factors = torch.tensor([p.colour for p in kept], dtype=torch.float32) if self.colour else None
        return (files, rx, ry, flips, shapes), (batch, factors)

    def _readable(self, plan: Plan) -> tuple[Plan, bytes | None, list[int]]:
        """``plan`` (or, replacing a corrupt image, the plan moved to the next readable one), its file
        (None: corrupt, not replaced) and the ids of the corrupt images passed over."""
        count, passed = len(self.ids), list[int]()
        for attempt in range(count):
            index = (plan.index + attempt) % count
            image_id = int(self.ids[index])
            if not self.dataset.is_corrupt(image_id):
                try:
                    data = self._read(index)
                    problem = encoded_problem(data)
                except OSError as exc:
                    problem = exc.strerror or type(exc).__name__
                if problem is None:
                    moved = plan if attempt == 0 else dataclasses.replace(plan, index=index)
                    return moved, data, passed
                _record_corrupt(self.dataset, index, problem)
            passed.append(image_id)
            if not self.replace_corrupt:
                return plan, None, passed
        raise DataError(
            f"none of the {count} images in {self.dataset.images_dir} can be read by the DALI loader (the "
            "warnings say why); check them with `retinaflow data validate`, or use --loader torch, which "
            "also reads formats DALI does not (GIF)"
        )

    def _read(self, index: int) -> bytes:
        """Image ``index``'s file, whole (paths as strings, kept once made: pathlib per read cost ~20 %
        of the read on the producer thread, which shares the GIL with the training loop)."""
        path = self._paths.get(index)
        if path is None:
            path = self._paths[index] = str(self.dataset.file_path(index))
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _targets(self, plans: list[Plan]) -> tuple[Batch, list[tuple[int, int]]]:
        """The Batch of ``plans`` without images, and each image's resized (h, w).

        The torch path's per-sample box transforms (clip to the original, scale, clip to the resized
        image, flip), applied to the whole batch's boxes at once: the same float32 arithmetic in a few
        ops per batch instead of a dozen per image (on the producer thread, in the training process)."""
        sizes = self.sizes[[p.index for p in plans]]  # (B, 2) original (h, w)
        scales = [
            resize_scale(int(h), int(w), p.shorter, self.max_size)
            for (h, w), p in zip(sizes, plans, strict=True)
        ]
        resized = [resized_size(int(h), int(w), s) for (h, w), s in zip(sizes, scales, strict=True)]
        raw = [self.dataset.targets(p.index) for p in plans]
        counts = [len(labels) for _, labels in raw]
        rows = torch.repeat_interleave(torch.arange(len(plans)), torch.tensor(counts, dtype=torch.int64))
        original = torch.from_numpy(sizes)[rows]  # (N, 2) per box
        new = torch.tensor(resized, dtype=torch.int64).view(-1, 2)[rows]
        boxes = torch.from_numpy(np.concatenate([b for b, _ in raw]).reshape(-1, 4))
        boxes = clip_boxes(boxes, original[:, 0], original[:, 1])
        boxes = resize_boxes(boxes, torch.tensor(scales)[rows], new[:, 0], new[:, 1])
        flip = torch.tensor([p.flip for p in plans])[rows]
        boxes = torch.where(flip[:, None], hflip_boxes(boxes, new[:, 0], new[:, 1]), boxes)
        labels = torch.from_numpy(np.concatenate([lab for _, lab in raw]).astype(np.int64))
        count = max([1, *counts])
        slot = torch.arange(len(rows)) - torch.tensor(np.cumsum([0, *counts[:-1]]), dtype=torch.int64)[rows]
        padded_boxes = torch.zeros((len(plans), count, 4), dtype=torch.float32)
        padded_labels = torch.full((len(plans), count), -1, dtype=torch.int64)
        padded_boxes[rows, slot] = boxes
        padded_labels[rows, slot] = labels
        batch = Batch(
            images=torch.empty(0),
            boxes=padded_boxes,
            labels=padded_labels,
            image_ids=torch.tensor([self.ids[p.index] for p in plans], dtype=torch.int64),
            scales=torch.tensor(scales, dtype=torch.float32),
            sizes=torch.tensor(resized, dtype=torch.int64).view(-1, 2),
        )
        return batch, resized

    def pop(self) -> tuple[Batch, torch.Tensor | None]:
        self.unconsumed.popleft()
        return self.pending.popleft()


def _record_corrupt(dataset: CocoDataset, index: int, reason: str) -> None:
    """Note image ``index`` as corrupt on ``dataset``; a warning the first time."""
    image_id = int(dataset.image_ids[index])
    if dataset.record_corrupt([image_id]):
        log.warning("skipping corrupt image %s (id %d): %s", dataset.file_path(index), image_id, reason)


class DaliDecodeError(DataError):
    """DALI failed on a batch (raised by ``dali.run_batch``); :func:`restarted` looks for the culprits."""


def restarted(source: BatchSource, error: DaliDecodeError) -> BatchSource:
    """After DALI failed on a batch: a new source that prepares the batches in flight again, then the
    rest, with the files that fail a CPU decode now passed over as corrupt (``source`` is closed).

    Raises ``error`` when every image in flight decodes on the CPU: nothing to skip, so a new pipeline
    would fail again."""
    source.close()
    replay = list(source.unconsumed)
    found = False
    for index in dict.fromkeys(p.index for plans in replay for p in plans):
        if source.dataset.is_corrupt(int(source.ids[index])):
            continue
        try:
            decode_file(source.dataset.file_path(index))
        except Exception as exc:  # as CocoDataset.decode: whatever the decoders raise means unreadable
            _record_corrupt(source.dataset, index, (str(exc).splitlines() or [type(exc).__name__])[0])
            found = True
    if not found:
        raise error
    return BatchSource(
        source.dataset, itertools.chain(replay, source.plans), source.policy, source.max_size,
        source.colour, source.replace_corrupt, source.skipped_ids,
    )  # fmt: skip


def train_plans(sampler: TrainBatchSampler, transform: TrainTransform) -> Iterator[list[Plan]]:
    """The sampler's batches with each sample's augmentation drawn from its own seed (as the torch path)."""
    for items in sampler:
        plans = []
        for index, seed, *pad in items:  # (index, seed) or (index, seed, H, W)
            d = transform.draw(seed)
            at_least = (pad[0], pad[1]) if pad else (0, 0)
            plans.append(Plan(index, d.shorter, d.flip, d.colour or (1.0, 1.0, 1.0), at_least))
        yield plans
