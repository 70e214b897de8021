"""GroupNorm as ``torch.ops.retinaflow.group_norm`` / ``group_norm_backward``, differentiable.

PyTorch's CUDA ``group_norm`` (torch <= 2.11) copies a channels_last activation to contiguous and returns a
contiguous output, so in a channels_last network each GroupNorm costs two layout copies and leaves the
next convolution NCHW data; under autocast it also runs in float32. The retinaflow kernel
(``kernels/group_norm.cu``) reads and writes the channels_last layout in the activation's dtype, with
float32 statistics, in three passes forward and three backward (no atomics: deterministic). CPU tensors
run the PyTorch reference (:func:`retinaflow.ops._reference.group_norm`), which defines the semantics.
"""

from __future__ import annotations

from typing import Any

import torch

from retinaflow.ops import _ext
from retinaflow.ops._library import MAX_NORM_CHANNELS

__all__ = ["group_norm", "kernel_serves"]


def kernel_serves(x: torch.Tensor) -> bool:
    """Whether :func:`group_norm` of the CUDA tensor ``x`` (B, C, H, W) runs the compiled kernel (loaded on
    first use): C within the kernel's limit and the kernels built. Where they cannot be built PyTorch's
    own ``group_norm`` is faster than the reference."""
    if x.shape[1] > MAX_NORM_CHANNELS:
        return False
    _ext.ensure_loaded_for(x)
    return _ext.kernels_loaded()


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        groups: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        y, mean, rstd = torch.ops.retinaflow.group_norm(x, weight, bias, groups, eps)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, d_weight, d_bias = torch.ops.retinaflow.group_norm_backward(dy, x, weight, mean, rstd, ctx.groups)
        return (
            dx,
            None,
            d_weight.to(weight.dtype) if weight is not None else None,
            d_bias.to(bias.dtype) if bias is not None else None,
            None,
        )


def group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` in x's dtype and memory format.

    x: (B, C, H, W) float (CUDA: float32/float16/bfloat16, C <= ``MAX_NORM_CHANNELS``), C divisible by
    ``groups``;
    weight, bias: (C,) or None -> (B, C, H, W). Differentiable in x, weight and bias.
    """
    _ext.ensure_loaded_for(x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        out: torch.Tensor = _GroupNorm.apply(x, groups, weight, bias, eps)
        return out
    return torch.ops.retinaflow.group_norm(x, weight, bias, groups, eps)[0]
