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
    updates_running_stats,
)
from retinaflow.model.retinanet import build_model


@pytest.mark.parametrize(("norm", "broadcast"), [("frozen_bn", False), ("gn", False), ("bn", True)])
def test_ddp_broadcasts_buffers_only_when_training_changes_them(norm: str, broadcast: bool) -> None:
    cfg = ModelConfig(backbone="mobilenet_v2", norm=norm, head_norm="gn", fpn_channels=16, head_convs=1)
    model = build_model(cfg)
    assert updates_running_stats(model) is broadcast


@pytest.mark.parametrize(
    ("norm", "grad_sync", "ranks_per_node", "expected"),
    [
        ("frozen_bn", "auto", 4, ("after_backward", "train.grad_sync=auto: one node")),
        ("gn", "auto", 2, ("ddp", "train.grad_sync=auto: 2 nodes")),  # DDP overlaps the slower all-reduce
        # plain BN's statistics are averaged with the gradients (tests/engine/test_gradient_average.py)
        ("bn", "auto", 4, ("after_backward", "train.grad_sync=auto: one node")),
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
    ("device", "graphs", "shapes", "options", "warn_limit"),
    [
        ("cuda", False, 12, None, 8),
        ("cuda", True, None, {"triton.cudagraphs": True}, 8),
        ("cuda", True, 3, {"triton.cudagraphs": True}, 8),
        ("cuda", True, 12, {"triton.cudagraphs": True}, 12),
        ("cpu", True, 12, None, 8),  # nothing to replay on a CPU: compiled without graphs, with a warning
    ],
)
def test_cuda_graphs_are_asked_of_inductor_for_cuda_devices_only(
    monkeypatch, caplog, device, graphs, shapes, options, warn_limit
):
    """``train.cuda_graph`` reaches ``torch.compile`` as inductor's option (the GPU test checks that the
    graphs are recorded and train as without them); bucketed shapes raise inductor's many-shapes warning
    limit to the bucket count."""
    asked: dict = {}
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: asked.update(kw) or net)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device(device))
    net = torch.nn.Linear(2, 2)
    # the warning's limit is read when inductor records a graph, not when it compiles: set globally
    with torch._inductor.config.patch({"triton.cudagraph_dynamic_shape_warn_limit": 8}):
        assert compiled(net, "inductor", info, graphs, shapes) is net
        assert torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit == warn_limit
    assert asked == {"backend": "inductor", "options": options, "dynamic": None}
    assert ("no CUDA device" in caplog.text) is (device == "cpu")
    real_compile(net, **asked)  # inductor checks its option names here (it compiles at the first call)


def test_static_shapes_compile_each_bucket_within_the_recompile_limit(monkeypatch):
    """``train.compile_shapes=static``: never symbolic sizes, and room for a graph per bucket."""
    asked: dict = {}
    monkeypatch.setattr(torch, "compile", lambda net, **kw: asked.update(kw) or net)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cuda"))
    with torch._dynamo.config.patch(recompile_limit=8):  # (monkeypatch would delete the key on undo)
        compiled(torch.nn.Linear(2, 2), "inductor", info, shapes=12, static=True)
        assert asked["dynamic"] is False and torch._dynamo.config.recompile_limit == 13
        compiled(torch.nn.Linear(2, 2), "inductor", info, shapes=4, static=True)
        assert torch._dynamo.config.recompile_limit == 13  # never lowered
