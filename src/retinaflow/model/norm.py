"""Normalisation layers of the detector (the ``model.norm`` choice), frozen batch norm, and folding it.

``model.norm`` picks the backbone's layer (:func:`norm_layer`): ``frozen_bn`` to fine-tune ImageNet
weights, ``bn`` / ``sync_bn`` / ``gn`` to train the statistics too, as training from random init needs
(a frozen BN of a random network is the identity, and the unnormalised network diverges at usual
learning rates). ``auto`` (:func:`resolve_norms`) picks frozen_bn with weights and gn without, and GroupNorm
in the head too (``model.head_norm``) when training from random init.

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

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import misc

from retinaflow.config import ModelConfig
from retinaflow.errors import ConfigError
from retinaflow.ops.norm import group_norm as channels_last_group_norm
from retinaflow.ops.norm import kernel_serves

NORMS = ("frozen_bn", "bn", "sync_bn", "gn")
HEAD_NORMS = ("none", "gn", "bn")
NormLayer = Callable[[int], nn.Module]


def resolve_norms(cfg: ModelConfig, pretrained: bool) -> ModelConfig:
    """``cfg`` with ``norm`` and ``head_norm`` made concrete: ``auto`` is frozen_bn / none (the ODTK
    network) when ``pretrained`` (training starts from backbone weights or a checkpoint), gn / gn from
    random init. Raises ConfigError for an unknown name."""
    norm = ("frozen_bn" if pretrained else "gn") if cfg.norm == "auto" else cfg.norm
    head_norm = ("none" if pretrained else "gn") if cfg.head_norm == "auto" else cfg.head_norm
    if norm not in NORMS:
        raise ConfigError(f"model.norm must be auto or one of {', '.join(NORMS)}, got {cfg.norm!r}")
    if head_norm not in HEAD_NORMS:
        raise ConfigError(
            f"model.head_norm must be auto or one of {', '.join(HEAD_NORMS)}, got {cfg.head_norm!r}"
        )
    return dataclasses.replace(cfg, norm=norm, head_norm=head_norm)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``channels`` below (MobileNetV2 has 24, 144), and
    at least 2 channels a group so that a 1x1 map (P7 of a small image) of one image still normalises."""
    groups = next(g for g in range(max(1, min(32, channels // 2)), 0, -1) if channels % g == 0)
    return GroupNorm(groups, channels)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a bf16/fp16 activation in its dtype and a CUDA channels_last one in its
    layout.

    forward(x: (B, C, H, W)) -> (B, C, H, W) in ``x``'s dtype. Autocast runs ``group_norm`` in float32, so
    each GroupNorm of a bf16 network would cast its input up, write a float32 output and leave the next
    convolution to cast it back (the same waste :class:`FrozenBatchNorm2d` removes), and PyTorch's CUDA
    kernel returns a contiguous tensor for a channels_last one. A channels_last CUDA input therefore goes
    through the retinaflow kernel, :func:`retinaflow.ops.norm.group_norm` (eagerly, where the kernels are
    built: under ``torch.compile`` and ``torch.export`` the compiler's own GroupNorm lowering is used);
    other inputs through PyTorch's kernel, in the input's dtype. Statistics accumulate in float32 either
    way. Same parameters and state-dict keys as ``nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.is_cuda
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling()
            and kernel_serves(x)
        ):
            return channels_last_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if x.dtype not in (torch.float16, torch.bfloat16) or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if torch.compiler.is_compiling():
            return _native_group_norm(x, self.num_groups, weight, bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.group_norm(x, self.num_groups, weight, bias, self.eps)


def _native_group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.group_norm`` in ``x``'s dtype under autocast, without an autocast context: the
    ``native_group_norm`` that ATen's ``group_norm`` calls, which autocast leaves alone. Under
    ``torch.compile`` a context manager enters the graph, and AOTAutograd's cache refuses graphs that
    hold one in some torch versions: a warm start from ``train.compile_cache`` then traced the training
    graph again. The compiled forward and backward hold the same ops either way (tests/model/test_norm.py)."""
    n, c = x.shape[0], x.shape[1]
    return torch.ops.aten.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), groups, eps)[0]


def norm_layer(norm: str) -> NormLayer:
    """The ``channels -> module`` factory of a concrete ``model.norm`` (sync_bn builds BatchNorm2d: the
    trainer converts it with ``nn.SyncBatchNorm.convert_sync_batchnorm`` once DDP is up)."""
    table: dict[str, NormLayer] = {
        "frozen_bn": FrozenBatchNorm2d,
        "bn": nn.BatchNorm2d,
        "sync_bn": nn.BatchNorm2d,
        "gn": group_norm,
    }
    if norm not in table:
        raise ConfigError(f"model.norm must be one of {', '.join(NORMS)} here, got {norm!r}")
    return table[norm]


class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """BatchNorm2d with fixed statistics and affine, computed in the input's dtype.

    forward(x: (B, C, H, W)) -> (B, C, H, W), same dtype and memory format as ``x``.
    Same buffers (``weight``, ``bias``, ``running_mean``, ``running_var``) and state-dict keys as
    torchvision's ``FrozenBatchNorm2d``, which it subclasses.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)
        # dtype -> (buffers' storage and versions, scale, shift): see _affine
        self._cache: dict[torch.dtype, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, shift)``, each (C,) in the buffers' dtype: ``bn(x) = x * scale + shift``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._affine(x.dtype)
        return torch.addcmul(shift, x, scale)

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1) scale and shift in ``dtype``, computed once while the buffers stay the same.

        Eagerly, recomputing them costs six small kernels per layer and step (~320 launches per R50
        forward, in a training step bound by the host's launches); the cache is keyed by the buffers'
        storage and version counters, so ``load_state_dict``, ``.to()`` or an in-place edit refresh it.
        Traced, compiled or under inference mode (whose tensors training could not reuse) it is computed
        each call: in a graph it is a constant the compiler folds."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return self._shaped(dtype)
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple(v for b in buffers for v in (b.data_ptr(), b._version))
        hit = self._cache.get(dtype)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, *self._shaped(dtype))
            self._cache[dtype] = hit
        return hit[1], hit[2]

    def _shaped(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.scale_shift()
        return scale.to(dtype).view(1, -1, 1, 1), shift.to(dtype).view(1, -1, 1, 1)


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
