"""How the ranks stay in step: DDP or gradients averaged after backward (``train.grad_sync``), and when
BatchNorm statistics rule the after-backward average out. The equality of the two on real collectives:
tests/engine/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from retinaflow.config import Config, ModelConfig
from retinaflow.engine.distributed import DistInfo
from retinaflow.engine.grad_sync import (
    compiled,
    grad_sync_of,
    keep_ranks_in_step,
    keeps_running_stats_per_rank,
    updates_running_stats,
)
from retinaflow.errors import ConfigError
from retinaflow.model.retinanet import build_model


@pytest.mark.parametrize(("norm", "broadcast"), [("frozen_bn", False), ("gn", False), ("bn", True)])
def test_ddp_broadcasts_buffers_only_when_training_changes_them(norm: str, broadcast: bool) -> None:
    cfg = ModelConfig(backbone="mobilenet_v2", norm=norm, head_norm="gn", fpn_channels=16, head_convs=1)
    model = build_model(cfg)
    assert updates_running_stats(model) is broadcast
    # Averaging gradients after backward (no DDP, no buffer broadcast) leaves plain BN's statistics
    # per rank; SyncBatchNorm's are the global batch's on every rank.
    assert keeps_running_stats_per_rank(model) is broadcast
    assert not keeps_running_stats_per_rank(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model))


def test_gradients_averaged_after_backward_refuse_per_rank_batchnorm_statistics() -> None:
    """Refused before any collective: each rank's plain BN statistics would drift apart without DDP's
    buffer broadcast (the equality with DDP itself: tests/engine/test_distributed.py)."""
    cfg = ModelConfig(backbone="mobilenet_v2", norm="bn", head_norm="gn", fpn_channels=16, head_convs=1)
    two_ranks = DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu"))
    train_cfg = Config().train
    train_cfg.grad_sync = "after_backward"
    with pytest.raises(ConfigError, match=r"model\.norm=sync_bn or frozen_bn, or train\.grad_sync=ddp"):
        keep_ranks_in_step(build_model(cfg), train_cfg, two_ranks)


@pytest.mark.parametrize(
    ("norm", "grad_sync", "ranks_per_node", "expected"),
    [
        ("frozen_bn", "auto", 4, ("after_backward", "train.grad_sync=auto: one node")),
        ("gn", "auto", 2, ("ddp", "train.grad_sync=auto: 2 nodes")),  # DDP overlaps the slower all-reduce
        ("bn", "auto", 4, ("ddp", "train.grad_sync=auto: BatchNorm statistics kept in step by DDP")),
        ("sync_bn", "auto", 4, ("after_backward", "train.grad_sync=auto: one node")),
        ("frozen_bn", "ddp", 4, ("ddp", "train.grad_sync=ddp")),
        ("gn", "after_backward", 1, ("after_backward", "train.grad_sync=after_backward")),
    ],
)
def test_grad_sync_auto_averages_after_backward_on_one_node_without_per_rank_batchnorm(
    norm: str, grad_sync: str, ranks_per_node: int, expected: tuple[str, str]
) -> None:
    cfg = ModelConfig(backbone="mobilenet_v2", norm="bn" if norm == "sync_bn" else norm, head_norm="gn")
    cfg.fpn_channels, cfg.head_convs = 16, 1
    model = build_model(cfg)
    if norm == "sync_bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    cpu = torch.device("cpu")
    four = DistInfo(rank=0, world_size=4, local_rank=0, local_world_size=ranks_per_node, device=cpu)
    train_cfg = Config().train
    assert train_cfg.grad_sync == "auto"
    train_cfg.grad_sync = grad_sync
    assert grad_sync_of(model, train_cfg, four) == expected


@pytest.mark.parametrize(
    ("device", "graphs", "shapes", "options"),
    [
        ("cuda", False, 12, None),
        ("cuda", True, None, {"triton.cudagraphs": True}),
        ("cuda", True, 3, {"triton.cudagraphs": True, "triton.cudagraph_dynamic_shape_warn_limit": 8}),
        ("cuda", True, 12, {"triton.cudagraphs": True, "triton.cudagraph_dynamic_shape_warn_limit": 12}),
        ("cpu", True, 12, None),  # nothing to replay on a CPU: compiled without graphs, with a warning
    ],
)
def test_cuda_graphs_are_asked_of_inductor_for_cuda_devices_only(
    monkeypatch, caplog, device, graphs, shapes, options
):
    """``train.cuda_graph`` reaches ``torch.compile`` as inductor's option (the GPU test checks that the
    graphs are recorded and train as without them); bucketed shapes raise inductor's many-shapes warning
    limit to the bucket count."""
    asked: dict = {}
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: asked.update(kw) or net)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device(device))
    net = torch.nn.Linear(2, 2)
    assert compiled(net, "inductor", info, graphs, shapes) is net
    assert asked == {"backend": "inductor", "options": options}
    assert ("no CUDA device" in caplog.text) is (device == "cpu")
    real_compile(net, **asked)  # inductor checks its option names here (it compiles at the first call)
