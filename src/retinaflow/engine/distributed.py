"""Process-group set-up for torchrun (any number of GPUs and nodes) and small collective helpers.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process. NCCL on CUDA,
gloo on CPU. Everything here is a no-op for a single process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank, the number of ranks on this node
    (torchrun's ``LOCAL_WORLD_SIZE``), and the device it drives."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        """How many nodes the ranks span (equal counts per node, as torchrun starts them)."""
        return self.world_size // self.local_world_size


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``device`` forces ``"cpu"`` or ``"cuda"``; by default a rank uses ``cuda:LOCAL_RANK`` when CUDA is
    present, else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # Without LOCAL_WORLD_SIZE (a launcher other than torchrun) each rank counts as its own node.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (returns it)."""
    if info.distributed and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Collect one picklable object per rank on rank 0 (others get None)."""
    if not (info.distributed and dist.is_initialized()):
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_min(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Minimum of a tensor over ranks in place (returns it).

    Used for decisions every rank must take together (a stop request, the first non-finite loss), so
    that no rank leaves the loop while the others wait in a collective.
    """
    if info.distributed and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


class LaggedMean:
    """The mean over ranks of a per-rank count (the loss's foreground anchors), without a mid-step wait.

    Called in the loss forward with this rank's count (0-dim tensor), it starts an asynchronous
    all-reduce and returns the mean of the *previous* step (the first step waits for its own): the loss
    is normalised by a value every rank already holds, so no rank waits for the others before its
    backward. :meth:`correction` (after backward, before clipping and the optimizer step) waits for this
    step's all-reduce -- with NCCL the GPU waits, not the host -- and returns used / exact, by which the
    caller multiplies the (DDP-averaged) gradients and the losses: the result is what normalising by this
    step's exact mean gives, up to float rounding, and equal on every rank. Both values are clamped to
    >= 1 as the loss clamps its normaliser.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.previous: torch.Tensor | None = None  # the normaliser the loss gets (the last exact mean)
        self.pending: tuple[Any, torch.Tensor] | None = None  # this step's all-reduce and its result

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        total = local.detach().to(torch.float32).clone()
        work = dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True)
        if self.previous is None:  # nothing to go by yet: this once, wait for the exact value
            work.wait()
            self.previous = self._mean(total)
        else:
            self.pending = (work, total)
        return self.previous

    def correction(self) -> torch.Tensor | None:
        """used / exact for this step's loss (None when the exact value was used), the stream made to
        wait for the all-reduce; the exact mean becomes the next step's normaliser."""
        if self.pending is None:
            return None
        assert self.previous is not None
        work, total = self.pending
        self.pending = None
        work.wait()
        exact = self._mean(total)
        factor = self.previous / exact
        self.previous = exact
        return factor

    def saved(self) -> torch.Tensor | None:
        """The normaliser the next step will use, on the CPU (for checkpoints; set ``previous`` back)."""
        return self.previous.detach().cpu() if self.previous is not None else None

    def _mean(self, total: torch.Tensor) -> torch.Tensor:
        return (total / self.info.world_size).clamp(min=1.0)


class GradientAverage:
    """Gradient averaging over ranks without DistributedDataParallel (``train.grad_sync`` "after_backward").

    Construction broadcasts rank 0's parameters and buffers, as DDP does. :meth:`__call__`, after backward,
    averages every gradient over the ranks in flat all-reduces of up to ``bucket_mb`` MB each: each bucket
    is copied into one buffer (in memory order), divided by the world size, summed and copied back --
    DDP's arithmetic (it divides before the sum too), so the same values up to the order of the sum.
    The running statistics of plain BatchNorm layers (``model.norm=bn``, ``model.head_norm=bn``), which
    each rank updates from its own batch, are averaged in the same call (one more all-reduce of a few
    hundred KB), so that every rank evaluates and saves the same model; DDP instead broadcasts rank 0's
    before every forward.

    Nothing overlaps the backward: the network runs as on one GPU (under ``torch.compile`` one graph,
    which DDP makes dynamo split at its buckets), no per-parameter hooks run, and the all-reduce is paid
    at the end of the step (R50-FPN's 150 MB of fp32 gradients: 0.6 ms between two H100s over NVLink;
    between hosts DDP's overlap is worth more). Every rank must run the same backward (the same
    parameters get gradients).
    """

    def __init__(self, model: torch.nn.Module, info: DistInfo, bucket_mb: int = 256) -> None:
        self.world = info.world_size
        self.bucket_bytes = bucket_mb * 2**20
        self.buckets = self._buckets([p for p in model.parameters() if p.requires_grad])
        self.statistics = per_rank_statistics(model)
        with torch.no_grad():
            for bucket in self._buckets([*model.parameters(), *model.buffers()]):
                views = [_in_memory_order(t) for t in bucket]
                flat = torch.cat(views)
                dist.broadcast(flat, src=0)
                torch._foreach_copy_(views, flat.split([v.numel() for v in views]))

    @torch.no_grad()
    def __call__(self) -> None:
        for params in self.buckets:
            views = [_in_memory_order(p.grad) for p in params if p.grad is not None]
            if not views:
                continue
            self._average(views)
        if self.statistics:
            self._average(self.statistics)

    def _average(self, views: list[torch.Tensor]) -> None:
        """In place, ``views`` (1-D, one dtype and device) averaged over the ranks in one all-reduce."""
        flat = torch.cat(views)
        flat.div_(self.world)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        torch._foreach_copy_(views, flat.split([v.numel() for v in views]))

    def _buckets(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``tensors`` in order, grouped by dtype and device, cut once a group holds ``bucket_bytes``."""
        done: list[list[torch.Tensor]] = []
        open_: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], int]] = {}
        for t in tensors:
            key = (t.dtype, t.device)
            bucket, size = open_.get(key, ([], 0))
            if size >= self.bucket_bytes:
                done.append(bucket)
                bucket, size = [], 0
            bucket.append(t)
            open_[key] = (bucket, size + t.numel() * t.element_size())
        return done + [bucket for bucket, _ in open_.values()]


def tracked_batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose running statistics training updates (``model.norm`` bn or sync_bn,
    ``model.head_norm=bn``)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def per_rank_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The running means and variances (float32, 1-D) of ``model``'s BatchNorm layers that each rank
    updates from its own batch: plain ``BatchNorm*d`` tracking statistics, not SyncBatchNorm (whose
    statistics are the global batch's on every rank)."""
    return [
        stat
        for m in tracked_batchnorms(model)
        if not isinstance(m, torch.nn.SyncBatchNorm)
        for stat in (m.running_mean, m.running_var)
        if stat is not None
    ]


def _in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in memory order (channels_last included): copies to and from a
    flat buffer then run as one multi-tensor kernel each, not one strided copy per tensor."""
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"expected a dense tensor, got shape {tuple(t.shape)} strides {t.stride()}")
    return t.as_strided((t.numel(),), (1,))


def warn_if_world_changed(saved: int | None, info: DistInfo, batch: int, path: str | Path) -> None:
    """Say (once: call it on rank 0) that a checkpoint written by ``saved`` ranks resumes on another count.

    The global batch (``batch``) is split anew. Batch ``k`` of the global stream holds the same images for any
    number of ranks while the dataset size divides by both counts (the sampler cuts one shuffled order
    into consecutive global batches); otherwise the sampler's padding shifts it by a few images per
    epoch. Either way the run continues, but does not repeat the original run bit for bit (the per-rank
    split changes how gradients are summed). ``saved`` is None for checkpoints from before it was saved.
    """
    if saved is None or int(saved) == info.world_size:
        return
    log.warning(
        "checkpoint %s was trained on %d rank(s), resuming on %d: global batch %d, %d per rank; the data "
        "stream continues at the same position, but not bit for bit as on %d rank(s)",
        path, saved, info.world_size, batch, batch // info.world_size, saved,
    )  # fmt: skip


def leave_together(info: DistInfo) -> None:
    """After a stop all ranks decided together: wait for each other, then ignore SIGTERM until exit.

    torchrun SIGTERMs the other workers as soon as one exits with an error; without this, a rank still
    reporting the stop (rank 0: callbacks, the console message) could be killed halfway by it. Every
    rank has already written what it must and leaves on its own; SIGINT and SIGKILL still work.
    """
    if not info.distributed:
        return
    barrier(info)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
