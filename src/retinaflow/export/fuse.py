"""Graph pass for CUDA engines: each convolution's epilogue (bias + ReLU, bias + residual add + ReLU) into
cuDNN's fused kernels.

Inductor calls cuDNN for a convolution and adds its bias, the residual and the ReLU in a separate Triton
kernel: one more read and write of every backbone activation. ``aten.cudnn_convolution_relu`` and
``aten.cudnn_convolution_add_relu`` do it in the convolution's epilogue. On one H100, R50-FPN fp16 at
800x1344 (``benchmarks/probe_conv_fusion.py``, compiled network): 674 -> 747 img/s at batch 32, 2.62 ->
2.42 ms at batch 1 (CUDA graph). The ops exist for CUDA only (cuDNN), so only CUDA engines use the pass;
AOTInductor calls them through its proxy executor (they have no C shim), which the C++ runner has too.
On by default (``export.fuse_epilogues``; ``--no-fuse-epilogues``).

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

from collections.abc import Callable
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
    """How many epilogues :func:`fuse_conv_activations` moved into cuDNN, and how many candidates it left
    because ``keep`` found the fused op slower."""

    conv_relu: int
    conv_add_relu: int
    left: int = 0


@dataclass(frozen=True)
class Candidate:
    """One convolution the pass could fuse (what ``keep`` decides on).

    ``input``, ``weight``, ``output``: shapes, (B, C, H, W) and (O, C/groups, kH, kW), with the batch
    dimension as in the program (an int, or None where it is dynamic); ``bias``: whether it has one;
    ``residual``: whether the fused op would add a residual; the rest are the convolution's arguments.
    """

    input: tuple[int | None, ...]
    weight: tuple[int, ...]
    output: tuple[int | None, ...]
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    residual: bool
    dtype: torch.dtype


Keep = Callable[[Candidate], bool]


def fuse_conv_activations(
    program: torch.export.ExportedProgram, keep: Keep | None = None
) -> tuple[torch.export.ExportedProgram, Fused]:
    """``program`` (its functional ATen form) with the patterns of the module docstring rewritten, each
    where ``keep(candidate)`` says so (default: all; :func:`faster_on` times them on the GPU)."""
    program = program.run_decompositions({})
    graph = program.graph_module.graph
    conv_relu = conv_add_relu = left = 0
    for relu in list(graph.nodes):
        if relu.op != "call_function" or relu.target is not RELU:
            continue
        src = relu.args[0]
        if _fusable_conv(src):
            conv, residual, dead = src, None, [src]
        else:
            match = _conv_plus_residual(src)
            if match is None:
                continue
            (conv, residual), dead = match, [src, match[0]]
        if keep is not None and not keep(_candidate(conv, residual is not None)):
            left += 1
            continue
        _replace(graph, relu, conv, residual, dead)
        if residual is None:
            conv_relu += 1
        else:
            conv_add_relu += 1
    graph.lint()
    program.graph_module.recompile()
    return program, Fused(conv_relu, conv_add_relu, left)


def faster_on(device: torch.device, batches: tuple[int, ...], iters: int = 20) -> Keep:
    """``keep`` for :func:`fuse_conv_activations` that times each candidate on ``device`` (CUDA) at each of
    ``batches`` (an engine's smallest and largest batch), channels_last, cuDNN autotuning on: the fused op
    is kept when, at every batch, it takes at most the plain convolution's time plus half the eager
    epilogue's (inductor's fused epilogue is one pass, eager takes two or three). Batch 1 is the noisy
    end: of an R50's 49 fusions, timing at batch 32 kept 48, at batches 1 and 32 only 27.
    """

    def keep(c: Candidate) -> bool:
        return all(faster_at(c, batch) for batch in batches)

    def faster_at(c: Candidate, batch: int) -> bool:
        def tensor(shape: tuple[int | None, ...]) -> torch.Tensor:
            sizes = [batch if d is None else d for d in shape]
            t = torch.randn(sizes, device=device, dtype=c.dtype)
            return t.contiguous(memory_format=torch.channels_last)

        x, w, out = tensor(c.input), tensor(c.weight), tensor(c.output)
        b = torch.randn(c.weight[0], device=device, dtype=c.dtype) if c.bias else None
        z = tensor(c.output) if c.residual else None
        conv = (c.stride, c.padding, c.dilation)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=True):
            plain = _ms(
                lambda: aten.convolution(x, w, None, *conv, False, [0] * len(c.stride), c.groups), iters
            )
            shift = b.view(1, -1, 1, 1) if b is not None else 0
            epilogue = _ms(lambda: ((out + shift) if z is None else (out + shift + z)).relu_(), iters)
            if z is None:
                fused = _ms(lambda: aten.cudnn_convolution_relu(x, w, b, *conv, c.groups), iters)
            else:
                fused = _ms(lambda: aten.cudnn_convolution_add_relu(x, w, z, 1.0, b, *conv, c.groups), iters)
        return fused <= plain + 0.5 * epilogue

    return keep


def _ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):  # cuDNN autotunes on the first call of a shape
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _candidate(conv: fx.Node, residual: bool) -> Candidate:
    args = _conv_args(conv)
    assert args is not None
    x, w, bias, stride, padding, dilation, groups = args

    def shape(node: object) -> tuple[int | None, ...]:
        assert isinstance(node, fx.Node)
        return tuple(d if isinstance(d, int) else None for d in node.meta["val"].shape)

    def ints(v: object) -> tuple[int, ...]:
        return tuple(int(i) for i in cast(list[int], v))

    weight = tuple(d for d in shape(w) if d is not None)
    return Candidate(
        shape(x),
        weight,
        shape(conv),
        bias is not None,
        ints(stride),
        ints(padding),
        ints(dilation),
        int(cast(int, groups)),
        residual,
        conv.meta["val"].dtype,
    )


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
    """A 2-D, non-transposed convolution node with a kernel of at most 3x3, read by one node only.

    Larger kernels stay out: ``cudnn_convolution_relu`` is known to run 17x slower on 7x7 channels_last
    convolutions (pytorch/pytorch#68506, open), the shape of ResNet's stem."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not _single_user(node):
        return False
    val, args = node.meta.get("val"), _conv_args(node)
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or args is None:
        return False
    weight = args[1].meta.get("val") if isinstance(args[1], fx.Node) else None
    return isinstance(weight, torch.Tensor) and max(weight.shape[2:]) <= 3


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
