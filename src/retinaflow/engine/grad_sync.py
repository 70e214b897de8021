"""How the ranks' copies of the model stay equal (``train.grad_sync``), and how such a model is compiled.

One process needs nothing. On several ranks the gradients are averaged either by DistributedDataParallel
(its all-reduces overlap the backward; it also broadcasts plain BatchNorm's running statistics) or after
backward in flat all-reduces (:class:`~retinaflow.engine.distributed.GradientAverage`: no DDP hooks, one
compiled graph; it averages plain BatchNorm's running statistics too). :func:`grad_sync_of` picks one
for ``train.grad_sync=auto`` and says why; :func:`keep_ranks_in_step` builds it; :func:`compiled` wraps
the result in ``torch.compile``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from retinaflow.config import TrainConfig
from retinaflow.engine import distributed as D

log = logging.getLogger(__name__)

# torch._dynamo.config.optimize_ddp when a DDP model is compiled. True: dynamo's DDPOptimizer
# splits the graph at DDP's buckets so that their all-reduces can start during the backward. With DDP's
# 25 MB buckets (~20 subgraphs) one unsplit graph scaled better on 2 H100s (1.65x against 1.48x); with
# COMPILED_DDP_BUCKET_MB buckets the split beats it: 1.744x against 1.549x, bf16 gradients 1.634x
# (bench_ddp.py, same call; docs/PERFORMANCE.md). bench_ddp.py's --ddp-variant NAME=optimize_ddp=...,
# bucket_cap_mb=... compares the modes.
COMPILED_DDP_SPLIT: Any = True  # a bool or one of dynamo's mode names
COMPILED_DDP_BUCKET_MB = 100


def updates_running_stats(model: nn.Module) -> bool:
    """Whether training changes any buffer of ``model``: BatchNorm's running statistics. Only then must
    DDP broadcast rank 0's buffers before every forward; frozen BN's statistics and GroupNorm have
    nothing to keep in step, and the broadcast would be one collective per step."""
    return bool(D.tracked_batchnorms(model))


def grad_sync_of(model: nn.Module, train: TrainConfig, info: D.DistInfo) -> tuple[str, str]:
    """``train.grad_sync`` made concrete for this job ("ddp" or "after_backward") and why, as the startup
    line says it. "auto" averages after backward on one node (an all-reduce of R50-FPN's gradients over
    NVLink: 0.6 ms); between nodes DDP overlaps the slower all-reduce with backward."""
    if train.grad_sync != "auto":
        return train.grad_sync, f"train.grad_sync={train.grad_sync}"
    if info.nodes > 1:
        return "ddp", f"train.grad_sync=auto: {info.nodes} nodes"
    return "after_backward", "train.grad_sync=auto: one node"


def keep_ranks_in_step(
    model: nn.Module, train: TrainConfig, info: D.DistInfo
) -> tuple[nn.Module, D.GradientAverage | None]:
    """How the ranks' copies of ``model`` stay equal (:func:`grad_sync_of`): the module to call and the
    gradient average to run after backward. One process: (model, None). "ddp": (DDP around the model,
    None). "after_backward": (model, GradientAverage)."""
    if not info.distributed:
        return model, None
    if grad_sync_of(model, train, info)[0] == "after_backward":
        return model, D.GradientAverage(model, info)
    ids = [info.device.index] if info.device.type == "cuda" else None
    # static_graph: every step uses every parameter in the same order, so DDP can fix its buckets and
    # skip its per-step graph bookkeeping: 1.77-1.80x instead of 1.69x on 2 H200s (bench_ddp.py). Left
    # off under torch.compile, whose DDPOptimizer splits the graph itself. Compiled: fewer, larger
    # buckets, so that dynamo's split (one subgraph per bucket) is short.
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=ids,
        broadcast_buffers=updates_running_stats(model),
        static_graph=not train.compile,
        bucket_cap_mb=COMPILED_DDP_BUCKET_MB if train.compile else None,
    )
    return ddp, None


def symbolic_sizes(shapes: int | None, static: bool) -> bool:
    """Whether a network compiled for batches of ``shapes`` padded shapes (None: unbounded) gets symbolic
    height and width: one graph for several shapes, unless ``static`` (one graph per shape)."""
    return not static and shapes != 1


def compiled(
    forward_net: nn.Module,
    backend: str,
    info: D.DistInfo,
    cuda_graph: bool = False,
    shapes: int | None = None,
    static: bool = False,
) -> nn.Module:
    """``torch.compile(forward_net, backend=...)``; a DDP model is split at its buckets (or not) as
    :data:`COMPILED_DDP_SPLIT` says, except with symbolic sizes (never split). Logs which graph layout the
    ranks get.

    ``cuda_graph`` (inductor only): the compiled forward and backward are replayed from CUDA graphs
    (inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets), one recording per input
    shape; on a CPU device inductor runs the compiled code without graphs (a warning says so). ``shapes``:
    how many padded shapes the batches have (their buckets; None: unbounded), recorded without inductor's
    warning about many shapes where the buckets bound them (its limit is global: raised, never lowered).
    ``static``: one graph per input shape (never symbolic sizes), with room for ``shapes`` of them before
    dynamo gives up recompiling."""
    if isinstance(forward_net, nn.parallel.DistributedDataParallel):
        # Dynamo's split does not take symbolic sizes (its subgraphs fail to compile: pytorch#111636, and
        # a CPU test here): with several padded shapes compiled as one graph, the DDP model is not split.
        symbolic = symbolic_sizes(shapes, static)
        split = False if symbolic else COMPILED_DDP_SPLIT
        torch._dynamo.config.optimize_ddp = split
        if split is True:
            log.info("compile: the DDP model's graph split at its %d MB buckets", COMPILED_DDP_BUCKET_MB)
        elif not split:
            why = ": it fails on symbolic sizes" if symbolic and COMPILED_DDP_SPLIT else ""
            log.info("compile: one graph for the DDP model (dynamo's bucket split off%s)", why)
    elif info.distributed:
        log.info("compile: one graph; gradients averaged after backward (train.grad_sync)")
    options: dict[str, Any] | None = None
    if cuda_graph and info.device.type != "cuda":
        log.warning("train.cuda_graph: no CUDA device, the compiled network runs without CUDA graphs")
    elif cuda_graph:
        log.info("compile: forward and backward replayed from CUDA graphs (train.cuda_graph)")
        options = {"triton.cudagraphs": True}
        # Inductor warns of "too many" recordings past its limit (8), read when it records, so set globally.
        warn = torch._inductor.config.triton
        if shapes is not None and warn.cudagraph_dynamic_shape_warn_limit is not None:
            warn.cudagraph_dynamic_shape_warn_limit = max(warn.cudagraph_dynamic_shape_warn_limit, shapes)
    if static:
        if shapes is not None:  # past the limit dynamo would run the network eagerly
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, shapes + 1)
        log.info("compile: one static graph per padded shape (train.compile_shapes=static)")
    dynamic = False if static else None
    return torch.compile(  # type: ignore[return-value]
        forward_net, backend=backend, options=options, dynamic=dynamic
    )
