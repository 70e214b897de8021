"""Sigmoid focal loss summed over a batch, without one-hot targets or saved intermediates.

torchvision's ``sigmoid_focal_loss`` on dense (B, N, C) targets keeps about ten full-size float32
tensors alive for backward (10.9 GB for 16 images at 800x1344). Here the loss is split into the
negative term over every valid (anchor, class) pair plus a correction at each anchor's labelled
class (gathered densely, zero where the anchor is not foreground), and the gradient is computed
analytically in backward from the logits alone:

    t = 0:  L = (1 - a) p^g softplus(x)          dL/dx = (1 - a) p^g (g (1 - p) softplus(x) + p)
    t = 1:  L = a (1 - p)^g softplus(-x)         dL/dx = -a (1 - p)^g (g p softplus(-x) + 1 - p)

with p = sigmoid(x), a = alpha, g = gamma. Values equal torchvision's to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _neg_loss(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    return (1 - alpha) * torch.sigmoid(x).pow(gamma) * F.softplus(x)


def _pos_loss(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    return alpha * (1 - torch.sigmoid(x)).pow(gamma) * F.softplus(-x)


def _neg_grad(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    p = torch.sigmoid(x)
    return (1 - alpha) * p.pow(gamma) * (gamma * (1 - p) * F.softplus(x) + p)


def _pos_grad(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    p = torch.sigmoid(x)
    q = 1 - p
    return -alpha * q.pow(gamma) * (gamma * p * F.softplus(-x) + q)


class _FocalSum(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        valid: torch.Tensor,
        labels: torch.Tensor,
        alpha: float,
        gamma: float,
    ) -> torch.Tensor:
        fg = labels >= 0
        column = labels.clamp(min=0)[..., None]  # (B, N, 1): the labelled class, 0 where there is none
        neg = (_neg_loss(logits, alpha, gamma) * valid[..., None]).sum()
        x_pos = logits.gather(-1, column).squeeze(-1)  # (B, N): every anchor's labelled-class logit
        correction = torch.where(fg, _pos_loss(x_pos, alpha, gamma) - _neg_loss(x_pos, alpha, gamma), 0.0)
        ctx.save_for_backward(logits, valid, labels)
        ctx.alpha, ctx.gamma = alpha, gamma
        return neg + correction.sum()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        logits, valid, labels = ctx.saved_tensors
        grad = _neg_grad(logits, ctx.alpha, ctx.gamma)
        grad.mul_(valid[..., None])
        column = labels.clamp(min=0)[..., None]
        # Foreground anchors (always valid) take the positive gradient at their class; the others write
        # back what is there, so one dense scatter serves every anchor.
        pos = _pos_grad(logits.gather(-1, column), ctx.alpha, ctx.gamma)
        grad.scatter_(-1, column, torch.where((labels >= 0)[..., None], pos, grad.gather(-1, column)))
        grad.mul_(grad_out)
        return grad, None, None, None, None


def focal_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Sum of the sigmoid focal loss over valid anchors and all classes.

    logits: (B, N, C) float32 raw class scores.
    labels: (B, N) int64 class index of foreground anchors, -1 elsewhere.
    valid:  (B, N) bool, False for anchors to ignore (they add no loss and get zero gradient).
    Returns a 0-dim float32 tensor, differentiable with respect to ``logits``. Every shape is known
    from the inputs' (no ``nonzero``), so the GPU never waits for the host nor the host for the GPU.
    """
    return _FocalSum.apply(logits.contiguous(), valid.to(logits.dtype), labels, alpha, gamma)
