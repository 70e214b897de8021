"""The cuDNN epilogue pass: which convolutions it fuses, and the rewritten program computes the same thing.

cuDNN's fused ops have no CPU kernel, so the test registers reference CPU kernels for them (convolution,
add, ReLU) for its duration: the rewritten program then runs here and must equal the original, which
checks every argument the pass moves (stride, padding, bias, residual, groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retinaflow.config import Config
from retinaflow.engine.infer import prepare_for_inference
from retinaflow.export.fuse import Fused, fuse_conv_activations
from retinaflow.model.retinanet import build_model

F = nn.functional


@pytest.fixture
def cpu_reference_kernels():
    lib = torch.library.Library("aten", "IMPL")

    def conv_relu(x, w, b, stride, padding, dilation, groups):
        return F.conv2d(x, w, b, stride, padding, dilation, groups).relu()

    def conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
        return (F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z).relu()

    lib.impl("cudnn_convolution_relu", conv_relu, "CPU")
    lib.impl("cudnn_convolution_add_relu", conv_add_relu, "CPU")
    yield
    del lib


class Network(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        cls, box = self.model(images)
        return [*cls, *box]


@pytest.mark.parametrize(
    ("backbone", "head_norm", "expected"),
    [
        # one per BasicBlock / Bottleneck (not the 7x7 stem); each block's last convolution takes the
        # residual. P7's input ReLU reads P6, which the head reads too: not fused. The GroupNorm head's
        # ReLUs follow norms.
        ("resnet18", "gn", Fused(conv_relu=8, conv_add_relu=8)),
        ("resnet50", "gn", Fused(conv_relu=2 * 16, conv_add_relu=16)),
        # ODTK's head: conv + ReLU four times per subnet, once per pyramid level (5 levels, 2 subnets)
        ("resnet18", "none", Fused(conv_relu=8 + 5 * 2 * 4, conv_add_relu=8)),
    ],
)
def test_fused_program_equals_the_original(cpu_reference_kernels, backbone, head_norm, expected):
    cfg = Config()
    cfg.model.backbone, cfg.model.norm, cfg.model.head_norm = backbone, "frozen_bn", head_norm
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for bn in model.modules():  # non-trivial statistics, so that folding them matters
        if hasattr(bn, "running_var") and bn.running_var is not None:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    prepare_for_inference(model, None)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    program = torch.export.export(Network(model).eval(), (images,))
    fused, counts = fuse_conv_activations(program)
    assert counts == expected
    targets = [str(n.target) for n in fused.graph.nodes]
    assert targets.count("aten.cudnn_convolution_relu.default") == expected.conv_relu
    assert targets.count("aten.cudnn_convolution_add_relu.default") == expected.conv_add_relu
    with torch.no_grad():
        want, got = program.module()(images), fused.module()(images)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_fused_ops_trace_with_a_dynamic_batch(cpu_reference_kernels):
    """The module's Meta kernels: re-exporting the fused program with a symbolic batch (what inductor does
    with an engine's batch range) traces through the cuDNN ops, channels_last in, channels_last out."""
    conv = nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    block = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(4, 8, 16, 16).to(memory_format=torch.channels_last)
    batch = {0: torch.export.Dim("batch", min=1, max=8)}
    fused, counts = fuse_conv_activations(torch.export.export(block, (x,), dynamic_shapes=(batch,)))
    assert counts == Fused(conv_relu=1, conv_add_relu=0)
    again = torch.export.export(fused.module(), (x,), dynamic_shapes=(batch,))
    (out,) = (n for n in again.graph.nodes if n.op == "output")
    val = out.args[0][0].meta["val"]
    assert isinstance(val.shape[0], torch.SymInt)
    assert val.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(again.module()(x[:3]), block(x[:3]))


def test_a_convolution_read_twice_or_a_broadcast_residual_stays(cpu_reference_kernels):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            y = self.a(x)
            kept = y.relu()  # y is also returned: cuDNN would not write it
            bias = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1): the fused add does not broadcast
            return y, kept, (self.b(x) + bias).relu()

    x = torch.randn(2, 4, 8, 8)
    program = torch.export.export(Block().eval(), (x,))
    fused, counts = fuse_conv_activations(program)
    assert counts == Fused(conv_relu=0, conv_add_relu=0)
    for w, g in zip(program.module()(x), fused.module()(x), strict=True):
        torch.testing.assert_close(g, w)


def test_keep_decides_each_candidate(cpu_reference_kernels):
    """``keep`` sees every candidate with its sizes (batch None where dynamic) and can leave it unfused."""
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU())
    x = torch.randn(2, 3, 16, 16)
    seen = []

    def keep(candidate):
        seen.append(candidate)
        return candidate.weight[1] == 3  # the first convolution only

    batch = {0: torch.export.Dim("batch", min=1, max=4)}
    program = torch.export.export(block.eval(), (x,), dynamic_shapes=(batch,))
    fused, counts = fuse_conv_activations(program, keep=keep)
    assert counts == Fused(conv_relu=1, conv_add_relu=0, left=1)
    first, second = seen
    assert first.input == (None, 3, 16, 16) and first.output == (None, 8, 8, 8) and first.stride == (2, 2)
    assert first.padding == (1, 1) and first.bias and not first.residual and first.dtype == torch.float32
    assert second.weight == (8, 8, 1, 1) and second.groups == 1
    torch.testing.assert_close(fused.module()(x), block(x))


def test_the_fusion_is_on_by_default_and_can_be_turned_off():
    from retinaflow.cli import build_parser
    from retinaflow.commands.export import export_config

    parse = build_parser().parse_args
    assert export_config(parse(["export", "m.pth", "m.pt2"])).fuse_epilogues
    assert not export_config(parse(["export", "m.pth", "m.pt2", "--no-fuse-epilogues"])).fuse_epilogues
