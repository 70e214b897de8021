"""group_norm_nhwc: PyTorch's group_norm values and gradients, in the input's dtype and memory format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retinaflow.model.group_norm import group_norm_nhwc

CL = torch.channels_last


def _inputs(dtype: torch.dtype, affine: bool = True) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    # A mean far from zero checks the E[x^2] - E[x]^2 variance against cancellation.
    x = (torch.randn(2, 12, 5, 7, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    w = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(12, generator=g, dtype=torch.float64)
    return x.contiguous(memory_format=CL), w if affine else None, b if affine else None  # type: ignore[return-value]


@pytest.mark.parametrize("affine", [True, False])
def test_values_and_gradients_match_group_norm_in_float64(affine: bool) -> None:
    x, w, b = _inputs(torch.float64, affine)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = group_norm_nhwc(x, 3, w, b, 1e-5)
    ref = nn.functional.group_norm(x, 3, w, b, 1e-5)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(ref)
    ours = torch.autograd.grad(y, leaves, dy)
    theirs = torch.autograd.grad(ref, leaves, dy)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e)


def test_gradcheck() -> None:
    x, w, b = _inputs(torch.float64)
    x = x[:1, :6, :3, :4].detach().requires_grad_()
    w, b = w[:6].requires_grad_(), b[:6].requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: group_norm_nhwc(t[0], 2, t[1], t[2], 1e-5), (x, w, b))


def test_keeps_dtype_and_channels_last_layout() -> None:
    x, w, b = _inputs(torch.bfloat16)
    x.requires_grad_()
    y = group_norm_nhwc(x, 3, w.float(), b.float(), 1e-5)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    ref = nn.functional.group_norm(x.detach().double(), 3, w, b, 1e-5)
    torch.testing.assert_close(y.double(), ref, atol=0.03, rtol=0.01)  # bf16 rounding of x, scale and y
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and x.grad.is_contiguous(memory_format=CL)


def test_no_grad_path_equals_the_autograd_path() -> None:
    x, w, b = _inputs(torch.float32)
    with torch.no_grad():
        plain = group_norm_nhwc(x, 4, w.float(), b.float(), 1e-5)
    tracked = group_norm_nhwc(x.requires_grad_(), 4, w.float(), b.float(), 1e-5)
    torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=0)


@pytest.mark.gpu
def test_group_norm_module_keeps_channels_last_on_cuda() -> None:
    from retinaflow.model.norm import GroupNorm

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layer = GroupNorm(32, 256).cuda()
    x = torch.randn(2, 256, 20, 30, device="cuda").contiguous(memory_format=CL).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    ref = nn.functional.group_norm(x.detach().bfloat16().float(), 32, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(y.float(), ref, atol=0.03, rtol=0.01)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
