"""Gradients averaged after backward (``train.grad_sync=after_backward``) on two gloo ranks of this CPU:
rank 0's start broadcast, the gradients and plain BatchNorm's running statistics averaged over the ranks.
(That it trains as DDP does, through torchrun: tests/engine/test_distributed.py.)"""

from __future__ import annotations

import dataclasses
import socket

import torch
from torch import distributed as dist
from torch import multiprocessing as mp

from retinaflow.config import ModelConfig
from retinaflow.engine.distributed import DistInfo, GradientAverage, per_rank_statistics
from retinaflow.model.retinanet import build_model

TINY = ModelConfig(backbone="resnet18", num_classes=3, fpn_channels=16, head_convs=1)


def _model(norm: str, head_norm: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(TINY, norm=norm, head_norm=head_norm)).train()


def _images(rank: int) -> torch.Tensor:
    """Each rank's own batch, of another scale: their BatchNorm statistics differ."""
    generator = torch.Generator().manual_seed(rank)
    return torch.rand(2, 3, 64, 96, generator=generator) * 255 * (1 + rank)


def _worker(rank: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank, local_world_size=2, device=torch.device("cpu"))
    model = _model("bn", "bn", seed=rank)  # other initial weights on each rank: the broadcast evens them
    average = GradientAverage(model, info)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cls, box = model(_images(rank))
    (sum(c.float().mean() for c in cls) + sum(b.float().pow(2).mean() for b in box)).backward()
    own = [s.clone() for s in per_rank_statistics(model)]
    own_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    average()
    out[rank] = {
        "start": start,
        "own": own,
        "averaged": [s.clone() for s in per_rank_statistics(model)],
        "own_grads": own_grads,
        "grads": [p.grad.clone() for p in model.parameters() if p.grad is not None],
    }
    dist.destroy_process_group()


def test_ranks_average_gradients_and_batchnorm_statistics() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        r0, r1 = out[0], out[1]
    for key, value in r0["start"].items():  # rank 0's weights and statistics on both ranks
        torch.testing.assert_close(r1["start"][key], value, rtol=0, atol=0)
    # the backbone's and every head level's BatchNorms: a mean and a variance each
    assert len(r0["own"]) == 2 * sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in _model("bn", "bn", 0).modules()
    )
    differ = [not torch.allclose(a, b) for a, b in zip(r0["own"], r1["own"], strict=True)]
    assert all(differ)  # each rank's batch moved its statistics its own way ...
    for a, b, got0, got1 in zip(r0["own"], r1["own"], r0["averaged"], r1["averaged"], strict=True):
        torch.testing.assert_close(got0, (a + b) / 2)  # ... and both now hold their mean
        torch.testing.assert_close(got1, got0, rtol=0, atol=0)
    for a, b, got0, got1 in zip(r0["own_grads"], r1["own_grads"], r0["grads"], r1["grads"], strict=True):
        torch.testing.assert_close(got0, (a + b) / 2)
        torch.testing.assert_close(got1, got0, rtol=0, atol=0)


def test_sync_batchnorm_and_frozen_statistics_are_not_averaged() -> None:
    assert per_rank_statistics(_model("frozen_bn", "gn", 0)) == []
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model("bn", "none", 0))
    assert per_rank_statistics(synced) == []
