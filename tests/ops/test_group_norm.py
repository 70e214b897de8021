"""retinaflow::group_norm and its backward: PyTorch's group_norm values and gradients, in the input's dtype
and memory format; the CUDA kernel against the reference (GPU tests)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retinaflow.ops import _ext, _reference
from retinaflow.ops.norm import group_norm

CL = torch.channels_last


def _inputs(
    dtype: torch.dtype, shape: tuple[int, int, int, int] = (2, 12, 5, 7), device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # A mean far from zero checks the E[x^2] - E[x]^2 variance against cancellation.
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 3
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=g, dtype=torch.float64)
    return x.to(device, dtype).contiguous(memory_format=CL), w.to(device), b.to(device)


@pytest.mark.parametrize("affine", [True, False])
def test_values_and_gradients_match_group_norm_in_float64(affine: bool) -> None:
    x, w, b = _inputs(torch.float64)
    weight, bias = (w, b) if affine else (None, None)
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    y = group_norm(x, 3, weight, bias, 1e-5)
    ref = nn.functional.group_norm(x, 3, weight, bias, 1e-5)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy), strict=True):
        torch.testing.assert_close(a, e)


def test_gradcheck() -> None:
    x, w, b = _inputs(torch.float64, (1, 6, 3, 4))
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: group_norm(t[0], 2, t[1], t[2], 1e-5), args)


def test_keeps_dtype_and_channels_last_layout() -> None:
    x, w, b = _inputs(torch.bfloat16)
    x.requires_grad_()
    y = group_norm(x, 3, w.float(), b.float(), 1e-5)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    ref = nn.functional.group_norm(x.detach().double(), 3, w, b, 1e-5)
    torch.testing.assert_close(y.double(), ref, atol=0.03, rtol=0.01)  # bf16 rounding of y
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and x.grad.is_contiguous(memory_format=CL)


def test_no_grad_path_equals_the_autograd_path() -> None:
    x, w, b = _inputs(torch.float32)
    with torch.no_grad():
        plain = group_norm(x, 4, w.float(), b.float(), 1e-5)
    tracked = group_norm(x.requires_grad_(), 4, w.float(), b.float(), 1e-5)
    torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=0)


def test_fake_implementation_gives_the_output_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 12, 5, 7).contiguous(memory_format=CL)
        y, mean, rstd = torch.ops.retinaflow.group_norm(x, None, None, 3, 1e-5)
        dx, dw, db = torch.ops.retinaflow.group_norm_backward(x, x, None, mean, rstd, 3)
    assert (tuple(y.shape), tuple(mean.shape), tuple(rstd.shape)) == ((2, 12, 5, 7), (2, 3), (2, 3))
    assert (tuple(dx.shape), tuple(dw.shape), tuple(db.shape)) == ((2, 12, 5, 7), (12,), (12,))


# CUDA kernel vs the reference: head-sized maps, MobileNetV2's odd channel counts, 1x1 maps, no affine.
# An odd channel count takes the one-channel-per-thread path.
CASES = [
    ((8, 256, 100, 168), 32),
    ((2, 24, 7, 5), 12),
    ((3, 144, 1, 1), 24),
    ((1, 64, 130, 3), 32),
    ((2, 15, 9, 4), 5),
]
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (0.04, 0.02), torch.float16: (5e-3, 3e-3)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_cuda_kernel_matches_the_reference(dtype: torch.dtype, shape: tuple, groups: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w, b = _inputs(dtype, shape, "cuda")
    _ext.ensure_loaded_for(x)
    w, b = w.float(), b.float()
    affine = shape[1] != 64  # one case without weight and bias
    weight, bias = (w, b) if affine else (None, None)
    y, mean, rstd = torch.ops.retinaflow.group_norm(x, weight, bias, groups, 1e-5)
    cpu = [t.cpu() if t is not None else None for t in (weight, bias)]
    ry, rmean, rrstd = _reference.group_norm(x.cpu(), cpu[0], cpu[1], groups, 1e-5)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(mean.cpu(), rmean, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rstd.cpu(), rrstd, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.cpu().float(), ry.float(), atol=atol, rtol=rtol)
    dy = torch.randn_like(x)
    dx, dw, db = torch.ops.retinaflow.group_norm_backward(dy, x, weight, mean, rstd, groups)
    rdx, rdw, rdb = _reference.group_norm_backward(dy.cpu(), x.cpu(), cpu[0], rmean, rrstd, groups)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=CL)
    scale = rdx.float().abs().max().item()
    torch.testing.assert_close(dx.cpu().float(), rdx.float(), atol=atol * scale, rtol=rtol)
    torch.testing.assert_close(dw.cpu(), rdw, atol=1e-2 * rdw.abs().max().item() + 1e-4, rtol=1e-3)
    torch.testing.assert_close(db.cpu(), rdb, atol=1e-2 * rdb.abs().max().item() + 1e-4, rtol=1e-3)
    # deterministic: a second run gives the same bits
    again = torch.ops.retinaflow.group_norm_backward(dy, x, weight, mean, rstd, groups)
    assert torch.equal(again[0], dx) and torch.equal(again[1], dw)


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
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
