"""NVIDIA DALI loaders (``data.loader: dali``): JPEG decode, resize, flip, colour jitter, padding on GPU.

What each batch holds is decided exactly as in the torch loader: the same batch sampler
(``loader.train_batches`` / ``loader.eval_batches``: DDP shard by rank, aspect-ratio groups, exact resume),
the same per-sample draws (``TrainTransform.draw``: shorter side capped by ``max_size``, flip, colour
factors) and the same box arithmetic (``transforms.resize_boxes`` / ``hflip_boxes``, given a whole
batch's boxes at once with per-box sizes), so boxes are identical to the torch loader's. A Python source
feeds the encoded files, sizes and factors to a ``@pipeline_def`` pipeline through
``fn.external_source``; DALI decodes (``decoders.image``, device "mixed": nvJPEG / the hardware JPEG
decoder), resizes (antialiased linear, to the exact integer size), flips and pads every image to the
batch's bucket (``fn.pad`` with a per-sample shape). The colour jitter (torchvision's arithmetic) then runs
on the whole padded batch on the same device (``transforms.colour_jitter_batch``: the
``retinaflow::colour_jitter`` kernels, two passes over uint8 data; as DALI arithmetic ops, per sample, it
took 57 % of the loader's time, as ~20 batched PyTorch ops about half). Pixels differ
from the torch loader's only by decoder and resampling rounding (see tests/data/test_dali.py for the
measured tolerance).

``fn.readers.coco`` is not used on purpose: its own shuffling cannot group batches by aspect ratio (so no
bounded set of shapes), cannot reproduce the torch loader's batches, and would need reader checkpoints to
resume exactly. Reading the files is a small share of the work; decoding and resizing are what DALI
accelerates.

Images reach the trainer as (B, 3, H, W) channels_last tensors on the GPU holding 0..255 (uint8 by
default: the network normalises its input itself, and uint8 moves a quarter of the bytes of float32).
Corrupt images are skipped and counted as in the torch path (training takes the next image in their
place, evaluation leaves them out; ``Batch.skipped``, ``dataset.report()["corrupt_images"]``). The source
checks each file's structure as it reads it (:func:`~retinaflow.data.images.encoded_problem`: empty,
truncated, not an image); a file that passes but still fails in DALI's decoder stops the pipeline, and the
loader then decodes the batches in flight on the CPU, records the files that fail, and starts a new
pipeline at the same batch (:func:`_restarted`). A failure no CPU decode explains raises DataError.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinaflow.config import DataConfig
from retinaflow.data.batch import Batch
from retinaflow.data.coco import CocoDataset
from retinaflow.data.images import decode_file, encoded_problem
from retinaflow.data.loader import TrainBatchSampler, check_loader_args, eval_batches, train_batches
from retinaflow.data.select import DALI_HINT
from retinaflow.data.shapes import ShapePolicy
from retinaflow.data.transforms import (
    TrainTransform,
    clip_boxes,
    colour_jitter_batch,
    hflip_boxes,
    resize_boxes,
    resize_scale,
    resized_size,
)
from retinaflow.errors import DataError, MissingDependency

log = logging.getLogger(__name__)

_END = object()  # BatchSource: the plans ran out


def require_dali() -> Any:
    """The ``nvidia.dali`` module, or MissingDependency with the install hint."""
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        raise MissingDependency(f"the DALI loader needs NVIDIA DALI: {DALI_HINT}") from exc
    return dali


@dataclass(frozen=True)
class PipelineOptions:
    """How the DALI graph is built.

    device_id: GPU to run on; None builds a CPU-only pipeline (decoder "cpu"), for tests and CPU hosts.
    threads: DALI's CPU threads (the decoder's host stage). Four: eight were slower on the H100 machine
    (3,150 against 3,325 img/s, benchmarks/probe_dali.py), fifteen slower still.
    """

    batch: int
    device_id: int | None
    threads: int = 4
    seed: int = 0


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
    prepare again after the pipeline failed (:func:`_restarted`).
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
    """DALI failed on a batch (raised by :func:`run_batch`); :func:`_restarted` looks for the culprits."""


def _restarted(source: BatchSource, error: DaliDecodeError) -> BatchSource:
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


def build_pipeline(source: Callable[[], Any], opts: PipelineOptions) -> Any:
    """The DALI pipeline: external source → decode → resize → flip → pad → (B, H, W, 3) uint8."""
    dali = require_dali()
    from nvidia.dali import fn, types

    @dali.pipeline_def(enable_conditionals=False)
    def pipeline() -> Any:
        files, rx, ry, flips, shapes = fn.external_source(source=source, num_outputs=5, batch=True)
        decoder = "mixed" if opts.device_id is not None else "cpu"
        images: Any = fn.decoders.image(files, device=decoder, output_type=types.DALIImageType.RGB)
        images = fn.resize(
            images, resize_x=rx, resize_y=ry, antialias=True, interp_type=types.DALIInterpType.INTERP_LINEAR
        )
        images = fn.flip(images, horizontal=flips)
        return fn.pad(images, axes=(0, 1), shape=shapes, fill_value=0)

    threads = max(1, opts.threads)
    # The dynamic executor hands GPU outputs over with a CUDA event instead of waiting for them on the
    # host. It gained 20 % (4,080 against 3,388 img/s) while the consumer made host syncs of its own, and
    # is level with the default executor without them (4,842 against 4,925; benchmarks/probe_dali.py).
    pipe = pipeline(
        batch_size=opts.batch,
        num_threads=threads,
        device_id=opts.device_id,
        seed=opts.seed,
        prefetch_queue_depth=2,
        exec_dynamic=True,
    )
    pipe.build()
    return pipe


def run_batch(pipe: Any, source: BatchSource, device: torch.device) -> Batch:
    """One pipeline iteration as a Batch; images (B, 3, H, W) channels_last on ``device``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    try:
        (out,) = pipe.run()
    except RuntimeError as exc:
        raise DaliDecodeError(
            f"DALI could not load a batch ({_dali_reason(str(exc))}) and every image in flight decodes "
            "on the CPU; check the images with `retinaflow data validate`, or use --loader torch"
        ) from exc
    batch, factors = source.pop()
    dense = out.as_tensor()
    images = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, images, cuda_stream=stream)
    batch.images = images.permute(0, 3, 1, 2)  # (B, H, W, 3) memory = channels_last (B, 3, H, W)
    if factors is not None:
        batch.images = colour_jitter_batch(batch.images, batch.sizes, factors)
    return batch


def _dali_reason(text: str) -> str:
    """The informative part of a DALI pipeline error: the failing operator and what it encountered
    (its first line is only "Critical error in pipeline:")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    where = next((line.rstrip(",") for line in lines if line.startswith("Error in ")), None)
    after = lines.index("encountered:") + 1 if "encountered:" in lines else None
    what = lines[after] if after is not None and after < len(lines) else None
    return ": ".join(part for part in (where, what) if part) or (lines[0] if lines else "decode failed")


def _device_id(device: torch.device) -> int | None:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def train_plans(sampler: TrainBatchSampler, transform: TrainTransform) -> Iterator[list[Plan]]:
    """The sampler's batches with each sample's augmentation drawn from its own seed (as the torch path)."""
    for items in sampler:
        plans = []
        for index, seed, *pad in items:  # (index, seed) or (index, seed, H, W)
            d = transform.draw(torch.Generator().manual_seed(seed))
            at_least = (pad[0], pad[1]) if pad else (0, 0)
            plans.append(Plan(index, d.shorter, d.flip, d.colour or (1.0, 1.0, 1.0), at_least))
        yield plans


class DaliTrainLoader:
    """Endless training batches from DALI (same interface as ``loader.TrainLoader``)."""

    def __init__(
        self,
        dataset: CocoDataset,
        data: DataConfig,
        sampler: TrainBatchSampler,
        policy: ShapePolicy,
        device: torch.device,
        seed: int,
    ) -> None:
        self.dataset, self.batch_sampler, self.policy, self.device = dataset, sampler, policy, device
        self.iteration = sampler.start_iteration
        self.skipped_ids: set[int] = set()
        transform = TrainTransform(data)
        colour = data.color_jitter > 0
        self.source = BatchSource(
            dataset, train_plans(sampler, transform), policy, data.max_size, colour, True, self.skipped_ids
        )
        self.opts = PipelineOptions(sampler.batch, _device_id(device), seed=seed)
        self.pipe = build_pipeline(self.source, self.opts)

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch_of(self.iteration)

    def __iter__(self) -> DaliTrainLoader:
        return self

    def __next__(self) -> Batch:
        while True:
            try:
                batch = run_batch(self.pipe, self.source, self.device)
                break
            except DaliDecodeError as exc:  # a corrupt file got past the source's check: skip it, go on
                self.source = _restarted(self.source, exc)
                self.pipe = build_pipeline(self.source, self.opts)
        self.iteration += 1
        return batch

    def close(self) -> None:
        self.source.close()
        self.pipe = None


class DaliEvalLoader:
    """One pass over this rank's evaluation batches per iteration (same interface as ``EvalLoader``)."""

    def __init__(
        self,
        dataset: CocoDataset,
        data: DataConfig,
        batches: list[list[int]],
        policy: ShapePolicy,
        device: torch.device,
    ) -> None:
        self.dataset, self.data, self.batches, self.policy, self.device = (
            dataset,
            data,
            batches,
            policy,
            device,
        )
        self.skipped_ids: set[int] = set()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return
        plans = ([Plan(i, self.data.resize, False, (1.0, 1.0, 1.0)) for i in b] for b in self.batches)
        source = BatchSource(
            self.dataset, plans, self.policy, self.data.max_size, False, False, self.skipped_ids
        )
        opts = PipelineOptions(max(len(b) for b in self.batches), _device_id(self.device))
        try:
            pipe = build_pipeline(source, opts)
            while True:  # until the plans run out (a batch whose images are all corrupt never comes)
                try:
                    batch = run_batch(pipe, source, self.device)
                except StopIteration:
                    return
                except DaliDecodeError as exc:
                    source = _restarted(source, exc)
                    pipe = build_pipeline(source, opts)
                    continue
                yield batch
        finally:
            source.close()


def build_dali_train_loader(
    data: DataConfig,
    batch: int,
    seed: int,
    rank: int,
    world_size: int,
    start_iteration: int,
    device: torch.device,
) -> tuple[DaliTrainLoader, CocoDataset]:
    """As ``loader.build_train_loader``, decoding and augmenting with DALI on ``device``."""
    require_dali()
    check_loader_args(data, batch, rank, world_size, start_iteration, train=True)
    assert data.images and data.annotations
    dataset = CocoDataset(data.images, data.annotations, None, replace_corrupt=True)
    sampler, policy = train_batches(dataset, data, batch, seed, rank, world_size, start_iteration)
    return DaliTrainLoader(dataset, data, sampler, policy, device, seed), dataset


def build_dali_eval_loader(
    images: str | Path,
    annotations: str | Path,
    data: DataConfig,
    batch: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> tuple[DaliEvalLoader, CocoDataset]:
    """As ``loader.build_eval_loader``, decoding and resizing with DALI on ``device``."""
    require_dali()
    check_loader_args(data, batch, rank, world_size)
    dataset = CocoDataset(images, annotations, None, replace_corrupt=False, require_annotations=False)
    batches, policy = eval_batches(dataset, data, batch, rank, world_size)
    return DaliEvalLoader(dataset, data, batches, policy, device), dataset
