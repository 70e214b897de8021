"""Process-group set-up for torchrun (any number of GPUs and nodes) and small collective helpers.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process. NCCL on CUDA,
gloo on CPU. Everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank, and the device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``device`` forces ``"cpu"`` or ``"cuda"``; by default a rank uses ``cuda:LOCAL_RANK`` when CUDA is
    present, else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


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


def any_rank(flags: tuple[bool, ...], info: DistInfo) -> tuple[bool, ...]:
    """Each flag true on every rank if it is true on any rank (one all-reduce for all of them).

    Used for decisions every rank must take together (stop requests, a non-finite loss), so that no
    rank leaves the loop while the others wait in a collective.
    """
    if not (info.distributed and dist.is_initialized()):
        return flags
    t = torch.tensor([1 if f else 0 for f in flags], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
