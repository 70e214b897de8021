"""Graph pass for CUDA engines: each convolution's epilogue (bias + ReLU, bias + residual add + ReLU) into
cuDNN's fused kernels.

Inductor calls cuDNN for a convolution and adds its bias, the residual and the ReLU in a separate Triton
kernel: one more read and write of every backbone activation. ``aten.cudnn_convolution_relu`` and
``aten.cudnn_convolution_add_relu`` do it in the convolution's epilogue. On one H100, R50-FPN fp16 at
800x1344 (``benchmarks/probe_conv_fusion.py``, compiled network): 674 -> 747 img/s at batch 32, 2.62 ->
2.42 ms at batch 1 (CUDA graph). The ops exist for CUDA only (cuDNN), so only CUDA engines use the pass;
AOTInductor calls them through its proxy executor (they have no C shim), which the C++ runner has too.

Rewritten, in a functional ATen graph (``ExportedProgram.run_decompositions({})``), where ``conv`` is an
``aten.conv2d`` or a non-transposed 2-D ``aten.convolution`` whose output has no other user:

- ``relu(conv(x, w, b))`` -> ``cudnn_convolution_relu(x, w, b)``
- ``relu(add(conv(x, w, b), z))`` (either operand order, alpha 1, ``z`` of the output's shape and dtype, the
  add's output used by the ReLU only) -> ``cudnn_convolution_add_relu(x, w, z, 1, b)``

PyTorch has no Meta (fake) kernels for the two ops, which ``torch.export`` and inductor need to trace a
program with a dynamic batch through them; this module registers them (output shape of the convolution,
layout as cuDNN picks it: channels_last when the input or the weight is).

The weights should be channels_last (cuDNN then runs NHWC, the fast layout for fp16/bf16 tensor cores):
:func:`retinaflow.export.aoti.export_pt2` converts the network before exporting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx
from torch._prims_common import suggest_memory_format

aten = torch.ops.aten
CONV, CONV2D, RELU, ADD = aten.convolution.default, aten.conv2d.default, aten.relu.default, aten.add.Tensor


def _meta_conv(x: torch.Tensor, w: torch.Tensor, *conv: Any) -> torch.Tensor:
    bias, stride, padding, dilation, groups = conv
    out = aten.convolution.default(x, w, bias, stride, padding, dilation, False, [0] * len(stride), groups)
    channels_last = torch.channels_last in (suggest_memory_format(x), suggest_memory_format(w))
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _meta_conv_relu(x: torch.Tensor, w: torch.Tensor, *conv: Any) -> torch.Tensor:
    return _meta_conv(x, w, *conv)


def _meta_conv_add_relu(
    x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, alpha: Any, *conv: Any
) -> torch.Tensor:
    return _meta_conv(x, w, *conv)


_META_LIBRARY = torch.library.Library("aten", "IMPL")
for _op, _fn in (
    ("cudnn_convolution_relu", _meta_conv_relu),
    ("cudnn_convolution_add_relu", _meta_conv_add_relu),
):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{_op}", "Meta"):
        _META_LIBRARY.impl(_op, _fn, "Meta")


@dataclass(frozen=True)
class Fused:
    """How many epilogues :func:`fuse_conv_activations` moved into cuDNN."""

    conv_relu: int
    conv_add_relu: int


def fuse_conv_activations(
    program: torch.export.ExportedProgram,
) -> tuple[torch.export.ExportedProgram, Fused]:
    """``program`` (its functional ATen form) with the patterns of the module docstring rewritten."""
    program = program.run_decompositions({})
    graph = program.graph_module.graph
    conv_relu = conv_add_relu = 0
    for relu in list(graph.nodes):
        if relu.op != "call_function" or relu.target is not RELU:
            continue
        src = relu.args[0]
        if _fusable_conv(src):
            _replace(graph, relu, src, None, [src])
            conv_relu += 1
            continue
        match = _conv_plus_residual(src)
        if match is not None:
            conv, residual = match
            _replace(graph, relu, conv, residual, [src, conv])
            conv_add_relu += 1
    graph.lint()
    program.graph_module.recompile()
    return program, Fused(conv_relu, conv_add_relu)


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _conv_args(node: fx.Node) -> tuple[fx.node.Argument, ...] | None:
    """``(x, w, bias, stride, padding, dilation, groups)`` of a 2-D convolution node, else None."""
    root = node.graph.owning_module
    if node.target is CONV2D and root is not None:
        args = node.normalized_arguments(root, normalize_to_only_use_kwargs=True)
        if args is None or isinstance(args.kwargs.get("padding"), str):
            return None
        keys = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        return tuple(cast(fx.node.Argument, args.kwargs[k]) for k in keys)
    if node.target is CONV and not node.args[6]:  # not transposed
        x, w, bias, stride, padding, dilation, _, _, groups = node.args
        return x, w, bias, stride, padding, dilation, groups
    return None


def _fusable_conv(node: object) -> bool:
    """A 2-D, non-transposed convolution node read by one node only."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not _single_user(node):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 4 and _conv_args(node) is not None


def _conv_plus_residual(node: object) -> tuple[fx.Node, fx.Node] | None:
    """``(conv, z)`` when ``node`` is ``add(conv, z)`` or ``add(z, conv)`` as the module docstring says."""
    if not isinstance(node, fx.Node) or node.target is not ADD or not _single_user(node):
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    a, b = node.args
    for conv, z in ((a, b), (b, a)):
        if isinstance(conv, fx.Node) and isinstance(z, fx.Node) and _fusable_conv(conv):
            out, res = conv.meta["val"], z.meta.get("val")
            if isinstance(res, torch.Tensor) and res.shape == out.shape and res.dtype == out.dtype:
                return conv, z
    return None


def _replace(
    graph: fx.Graph, relu: fx.Node, conv: fx.Node, residual: fx.Node | None, dead: list[fx.Node]
) -> None:
    args = _conv_args(conv)
    assert args is not None
    x, w, bias, stride, padding, dilation, groups = args
    with graph.inserting_before(relu):
        if residual is None:
            fused = graph.call_function(
                aten.cudnn_convolution_relu.default, (x, w, bias, stride, padding, dilation, groups)
            )
        else:
            fused = graph.call_function(
                aten.cudnn_convolution_add_relu.default,
                (x, w, residual, 1.0, bias, stride, padding, dilation, groups),
            )
    fused.meta = dict(relu.meta)
    relu.replace_all_uses_with(fused)
    graph.erase_node(relu)
    for node in dead:  # the add (if any), then the convolution: each had the next one as its only user
        graph.erase_node(node)
