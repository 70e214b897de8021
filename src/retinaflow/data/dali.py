"""NVIDIA DALI loaders (``data.loader: dali``): JPEG decode, resize, flip, colour jitter, padding on GPU.

What each batch holds is decided exactly as in the torch loader: the same batch sampler
(``sampler.train_batches`` / ``sampler.eval_batches``: DDP shard by rank, aspect and jitter-level groups,
exact resume), the same per-sample draws (``TrainTransform.draw``: shorter side capped by ``max_size``,
flip, colour factors) and the same box arithmetic (``transforms.resize_boxes`` / ``hflip_boxes``, given a
whole batch's boxes at once with per-box sizes), so boxes are identical to the torch loader's. A Python source
(``dali_source.BatchSource``) feeds the encoded files, sizes and factors to a ``@pipeline_def`` pipeline
through ``fn.external_source``; DALI decodes (``decoders.image``, device "mixed": nvJPEG / the hardware JPEG
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
pipeline at the same batch (``dali_source.restarted``). A failure no CPU decode explains raises DataError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import DataConfig
from retinaflow.data.batch import Batch
from retinaflow.data.coco import CocoDataset
from retinaflow.data.dali_source import BatchSource, DaliDecodeError, Plan, restarted, train_plans
from retinaflow.data.loader import check_loader_args
from retinaflow.data.sampler import TrainBatchSampler, eval_batches, train_batches
from retinaflow.data.select import DALI_HINT
from retinaflow.data.shapes import ShapePolicy
from retinaflow.data.transforms import TrainTransform, colour_jitter_batch
from retinaflow.errors import MissingDependency


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


class _Feed:
    """A BatchSource and the DALI pipeline it feeds. When DALI fails on a file the source's check let
    through, both start again at the same batch without it (``dali_source.restarted``)."""

    def __init__(self, source: BatchSource, opts: PipelineOptions, device: torch.device) -> None:
        self.source, self.opts, self.device = source, opts, device
        try:
            self.pipe = build_pipeline(source, opts)
        except BaseException:
            source.close()  # its producer thread would wait for a pipeline that never comes
            raise

    def next(self) -> Batch:
        """The next batch; StopIteration once the source's plans ran out."""
        while True:
            try:
                return run_batch(self.pipe, self.source, self.device)
            except DaliDecodeError as exc:
                self.source = restarted(self.source, exc)
                self.pipe = build_pipeline(self.source, self.opts)

    def close(self) -> None:
        self.source.close()
        self.pipe = None


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
        source = BatchSource(
            dataset, train_plans(sampler, transform), policy, data.max_size, colour, True, self.skipped_ids
        )
        self.feed = _Feed(source, PipelineOptions(sampler.batch, _device_id(device), seed=seed), device)

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch_of(self.iteration)

    def __iter__(self) -> DaliTrainLoader:
        return self

    def __next__(self) -> Batch:
        batch = self.feed.next()
        self.iteration += 1
        return batch

    def close(self) -> None:
        self.feed.close()


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
        feed = _Feed(source, opts, self.device)
        try:
            while True:  # until the plans run out (a batch whose images are all corrupt never comes)
                try:
                    batch = feed.next()
                except StopIteration:
                    return
                yield batch
        finally:
            feed.close()


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
