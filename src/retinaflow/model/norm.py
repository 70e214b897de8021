"""Frozen batch norm for detection backbones, and folding it into the preceding convolutions.

A detector fine-tunes with batches of a few large images, so the backbone's BatchNorm statistics and
affine are frozen (Detectron, ODTK, torchvision). Frozen, a BN layer is a per-channel ``x * scale + shift``:

- :class:`FrozenBatchNorm2d` applies it in one kernel and in the input's dtype. torchvision's version
  multiplies a bf16/fp16 activation by float32 buffers, which type promotion turns into a float32
  tensor: under autocast every backbone activation after a BN was written, rectified and re-read in
  float32 and cast back by the next convolution.
- :func:`fold_batchnorm` removes the layer altogether for inference: ``bn(conv(x)) == conv'(x)`` with
  ``W' = W * scale`` and ``b' = b * scale + shift``.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torchvision.ops import misc


class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """BatchNorm2d with fixed statistics and affine, computed in the input's dtype.

    forward(x: (B, C, H, W)) -> (B, C, H, W), same dtype and memory format as ``x``.
    Same buffers (``weight``, ``bias``, ``running_mean``, ``running_var``) and state-dict keys as
    torchvision's ``FrozenBatchNorm2d``, which it subclasses.
    """

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, shift)``, each (C,) in the buffers' dtype: ``bn(x) = x * scale + shift``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


def _scale_shift(bn: misc.FrozenBatchNorm2d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (scale, shift) of a frozen or eval-mode BatchNorm2d: ``bn(x) = x * scale + shift``."""
    mean, var = bn.running_mean, bn.running_var
    assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
    weight = bn.weight if isinstance(bn.weight, torch.Tensor) else torch.ones_like(var)
    bias = bn.bias if isinstance(bn.bias, torch.Tensor) else torch.zeros_like(mean)
    scale = weight.detach().double() * (var.double() + bn.eps).rsqrt()
    return scale, bias.detach().double() - mean.double() * scale


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, (misc.FrozenBatchNorm2d, nn.BatchNorm2d)):
        return False
    if isinstance(bn, nn.BatchNorm2d) and (bn.training or bn.running_mean is None):
        return False  # batch statistics are not a fixed affine
    return conv.out_channels == bn.weight.shape[0]


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> int:
    """Fold every frozen BN into the convolution that feeds it, in place; returns how many were folded.

    A BN is folded when it directly follows a ``Conv2d`` among its parent's children (``conv1, bn1``
    in ResNet blocks, ``[Conv2d, BatchNorm2d, ...]`` in ``Sequential`` stages) — how every registered
    backbone applies them; ``tests/model/test_norm.py`` checks the folded output of each. The conv
    gains a bias and the BN becomes ``nn.Identity``. For inference only: the folded network's state
    dict no longer matches checkpoints, and ``BatchNorm2d`` layers in training mode are left alone.
    """
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if not _foldable(conv, bn):
                continue
            assert isinstance(conv, nn.Conv2d)
            assert isinstance(bn, (misc.FrozenBatchNorm2d, nn.BatchNorm2d))
            scale, shift = _scale_shift(bn)
            weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
            bias = shift if conv.bias is None else conv.bias.double() * scale + shift
            conv.weight.copy_(weight.to(conv.weight.dtype))
            conv.bias = nn.Parameter(bias.to(conv.weight), requires_grad=conv.weight.requires_grad)
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    return folded
