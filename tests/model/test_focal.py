from __future__ import annotations

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from retinaflow.model.focal import focal_loss_sum


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 1.5), (0.75, 0.0)])
def test_matches_torchvision_values_and_gradients(alpha, gamma):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 40, 7, generator=gen) * 4).requires_grad_()
    labels = torch.randint(-1, 7, (3, 40), generator=gen)
    valid = (torch.rand(3, 40, generator=gen) > 0.3) | (labels >= 0)
    dense = (labels[..., None] == torch.arange(7)).float()
    ref = (sigmoid_focal_loss(x, dense, alpha, gamma, reduction="none").sum(-1) * valid).sum()
    (g_ref,) = torch.autograd.grad(ref, x)
    out = focal_loss_sum(x, labels, valid, alpha, gamma)
    (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(g[~valid] == 0)


def test_gradcheck_in_float64():
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, -1, 3, -1, 1], [-1, -1, 2, 2, -1]])
    valid = torch.ones(2, 5, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda z: focal_loss_sum(z, labels, valid, 0.25, 2.0), (x,))


def test_no_foreground_and_nothing_valid():
    x = torch.randn(1, 6, 3, requires_grad=True)
    none = torch.full((1, 6), -1)
    assert focal_loss_sum(x, none, torch.zeros(1, 6, dtype=torch.bool), 0.25, 2.0).item() == 0.0
    assert focal_loss_sum(x, none, torch.ones(1, 6, dtype=torch.bool), 0.25, 2.0).item() > 0.0
