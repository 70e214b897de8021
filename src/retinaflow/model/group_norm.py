"""GroupNorm that keeps a channels_last activation channels_last (PyTorch's CUDA kernel does not).

PyTorch's CUDA ``group_norm`` (torch <= 2.11 at least) copies a channels_last input to contiguous and
returns a contiguous output, so in a channels_last network every GroupNorm of the head costs two layout
copies and the next convolution runs on NCHW data. :func:`group_norm_nhwc` computes the same function
from per-(image, channel) sums, which reduce any memory format in place, and one broadcast
``addcmul`` that keeps the input's layout and dtype; its backward is the closed-form GroupNorm gradient
in the same three passes (two reductions, one ``addcmul`` pair), not autograd's chain of the forward's
ops. Statistics accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half inputs, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


def _group_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) of each (image, group) of x: (B, C, H, W) -> two (B, G) float32 (float64) tensors.

    Variance as E[x^2] - E[x]^2 from float32 sums (clamped at 0), so both sums read x once in any layout.
    """
    b, c, h, w = x.shape
    count = (c // groups) * h * w
    acc = _acc_dtype(x)
    s1 = x.sum((2, 3), dtype=acc).view(b, groups, -1).sum(-1)
    norms = torch.linalg.vector_norm(x, 2, (2, 3), dtype=acc)
    s2 = norms.square().view(b, groups, -1).sum(-1)
    mean = s1 / count
    var = (s2 / count - mean.square()).clamp_min(0.0)
    return mean, (var + eps).rsqrt()


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, G) -> (B, C): each group's value repeated over its channels."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)


def _affine(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd, scale): y = x * scale + shift per (image, channel), in x's dtype and layout."""
    c = x.shape[1]
    mean, rstd = _group_stats(x, groups, eps)
    scale = _per_channel(rstd, c)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -_per_channel(mean, c) * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    y = torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])
    return y, mean, rstd, scale


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        groups: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        y, mean, rstd, scale = _affine(x, groups, weight, bias, eps)
        ctx.groups = groups
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, mean, rstd, scale)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, mean, rstd, scale = ctx.saved_tensors
        b, c, h, w = x.shape
        groups, count = ctx.groups, (c // ctx.groups) * h * w
        acc = _acc_dtype(x)
        sum_dy = dy.sum((2, 3), dtype=acc)  # (B, C)
        sum_dy_x = (dy * x).sum((2, 3), dtype=acc)
        mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
        sum_dy_xhat = (sum_dy_x - mean_c * sum_dy) * rstd_c  # sum over H, W of dy * x_hat
        gamma = weight.to(acc) if weight is not None else torch.ones_like(sum_dy[0])
        # dx = rstd * (gamma * dy - mean_g(gamma * dy) - x_hat * mean_g(gamma * dy * x_hat)), means over
        # each group's channels and pixels: dx = scale * dy + k * x + m per (image, channel).
        m1 = (gamma * sum_dy).view(b, groups, -1).sum(-1) / count  # (B, G)
        m2 = (gamma * sum_dy_xhat).view(b, groups, -1).sum(-1) / count
        k = -_per_channel(rstd * rstd * m2, c)
        m = _per_channel(rstd * (rstd * m2 * mean - m1), c)
        dt = x.dtype
        dx = torch.addcmul(m.to(dt)[..., None, None], x, k.to(dt)[..., None, None])
        dx = torch.addcmul(dx, dy, scale.to(dt)[..., None, None])
        d_weight = sum_dy_xhat.sum(0).to(weight.dtype) if weight is not None else None
        d_bias = sum_dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return dx, None, d_weight, d_bias, None


def group_norm_nhwc(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` that returns x's dtype and memory format.

    x: (B, C, H, W), C divisible by ``groups``; weight, bias: (C,) or None -> (B, C, H, W). Differentiable
    in x, weight and bias (closed-form backward when any of them needs a gradient).
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad:
        out: torch.Tensor = _GroupNormNHWC.apply(x, groups, weight, bias, eps)
        return out
    return _affine(x, groups, weight, bias, eps)[0]
