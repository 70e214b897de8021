"""RetinaNet's classification and box subnets, shared over all pyramid levels, and their inference forms.

``norm="bn"`` gives each pyramid level its own BatchNorm after the shared convolutions (detectron2's
"domain-specific" head norm, ``CycleBatchNormList``): the levels' activations differ in scale, and one set
of statistics for all of them would fit none. In eval mode each level's norm is a fixed per-channel affine,
so :class:`UnsharedHead` folds it into a per-level copy of the convolutions: at inference the head costs
what the paper's unnormalised head costs (conv + bias + ReLU), where GroupNorm computes its statistics in
every call.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from retinaflow.errors import ConfigError
from retinaflow.model.norm import HEAD_NORMS, fold_batchnorm, group_norm


class LevelBatchNorm(nn.Module):
    """One ``BatchNorm2d`` per pyramid level, after a convolution that all levels share.

    forward(x: (B, C, H, W), level: int) -> (B, C, H, W): ``x`` normalised by level ``level``'s norm
    (batch statistics in training, running statistics in eval mode). A training batch with one value per
    channel (one image whose level is 1x1: P7 of a 128-px image) has no batch statistics; it is normalised
    with the running ones, which it leaves as they are.
    """

    def __init__(self, channels: int, num_levels: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_levels))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        bn = self.levels[level]
        assert isinstance(bn, nn.BatchNorm2d)
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            mean, var = bn.running_mean, bn.running_var
            return nn.functional.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return bn(x)


def _subnet(channels: int, num_convs: int, norm: str, num_levels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        if norm == "gn":
            layers.append(group_norm(channels))
        elif norm == "bn":
            layers.append(LevelBatchNorm(channels, num_levels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _tower(subnet: nn.Sequential, x: torch.Tensor, level: int) -> torch.Tensor:
    """``subnet(x)`` for pyramid level ``level`` (its own norm where the subnet has one per level)."""
    for layer in subnet:
        x = layer(x, level) if isinstance(layer, LevelBatchNorm) else layer(x)
    return x


class RetinaNetHead(nn.Module):
    """Two subnets of ``num_convs`` x (conv3x3 [+ norm] + ReLU), then an output conv3x3; the convolutions
    are shared by all ``num_levels`` pyramid levels. ``norm``: "none" (paper, ODTK), "gn" (GroupNorm,
    torchvision v2), "bn" (a BatchNorm per level: :class:`LevelBatchNorm`).

    forward(features: list of (B, channels, H_l, W_l)) ->
        cls: list of (B, A*C, H_l, W_l) raw logits,
        box: list of (B, A*4, H_l, W_l) raw box deltas (torchvision BoxCoder convention),
    channel layout anchor-major: ``view(B, A, C, H, W)`` / ``view(B, A, 4, H, W)``.

    Initialisation (paper): all conv weights normal(std=0.01), biases 0, except the classification
    output bias = -log((1 - prior) / prior) so every initial score is ``prior``.
    """

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        prior: float = 0.01,
        norm: str = "none",
        num_levels: int = 5,
    ) -> None:
        super().__init__()
        if not 0.0 < prior < 1.0:
            raise ConfigError(f"model.prior must lie in (0, 1), got {prior}")
        if num_classes < 1 or num_anchors < 1 or num_convs < 0:
            raise ConfigError(
                f"head needs num_classes >= 1, num_anchors >= 1 and head_convs >= 0; got "
                f"{num_classes}, {num_anchors}, {num_convs}"
            )
        if norm not in HEAD_NORMS:
            raise ConfigError(f"model.head_norm must be one of {', '.join(HEAD_NORMS)}, got {norm!r}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.norm = norm
        self.cls_subnet = _subnet(channels, num_convs, norm, num_levels)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_subnet = _subnet(channels, num_convs, norm, num_levels)
        self.box_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_logits.bias is not None:
            nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior) / prior))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls = [self.cls_logits(_tower(self.cls_subnet, f, level)) for level, f in enumerate(features)]
        box = [self.box_pred(_tower(self.box_subnet, f, level)) for level, f in enumerate(features)]
        return cls, box


class UnsharedHead(nn.Module):
    """Inference form of a ``norm="bn"`` :class:`RetinaNetHead` (eval mode): each level's BatchNorms folded
    into that level's own copy of the subnets' convolutions, ``bn(conv(x)) == conv'(x)``.

    ``cls_towers[l]`` / ``box_towers[l]``: level ``l``'s subnets, (conv3x3 + bias + ReLU) x num_convs;
    the output convolutions stay shared. Same forward and outputs as the head it was built from (whose
    weights it copies); the subnets' weights take ``num_levels`` times the memory (R50-FPN: 5 x 4.7 M).
    """

    def __init__(self, head: RetinaNetHead) -> None:
        super().__init__()
        if head.norm != "bn":
            raise ValueError(f"UnsharedHead folds per-level BatchNorms; this head's norm is {head.norm!r}")
        self.num_classes, self.num_anchors = head.num_classes, head.num_anchors
        levels = len(next(m for m in head.cls_subnet if isinstance(m, LevelBatchNorm)).levels)
        self.cls_towers = nn.ModuleList(_folded_subnet(head.cls_subnet, level) for level in range(levels))
        self.box_towers = nn.ModuleList(_folded_subnet(head.box_subnet, level) for level in range(levels))
        self.cls_logits, self.box_pred = head.cls_logits, head.box_pred

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls = [self.cls_logits(t(f)) for t, f in zip(self.cls_towers, features, strict=False)]
        box = [self.box_pred(t(f)) for t, f in zip(self.box_towers, features, strict=False)]
        return cls, box


def _folded_subnet(subnet: nn.Sequential, level: int) -> nn.Sequential:
    """A copy of ``subnet`` for pyramid level ``level``, its BatchNorms folded into its convolutions
    (:func:`~retinaflow.model.norm.fold_batchnorm`)."""
    tower = nn.Sequential(
        *(copy.deepcopy(m.levels[level] if isinstance(m, LevelBatchNorm) else m) for m in subnet)
    ).eval()
    fold_batchnorm(tower)
    return nn.Sequential(*(m for m in tower if not isinstance(m, nn.Identity)))


def unshare_level_norms(head: RetinaNetHead | UnsharedHead) -> RetinaNetHead | UnsharedHead:
    """The inference form of ``head``: an :class:`UnsharedHead` for a ``norm="bn"`` head (its running
    statistics folded; the head is put in eval mode), ``head`` itself otherwise."""
    if isinstance(head, RetinaNetHead) and head.norm == "bn":
        return UnsharedHead(head.eval())
    return head


class MergedHead(nn.Module):
    """Inference form of a :class:`RetinaNetHead` or :class:`UnsharedHead`: both subnets as one tower of
    twice the channels (one tower per level for an UnsharedHead, whose levels have their own weights).

    The first conv reads the shared input with both subnets' filters (C -> 2C), the later ones are
    grouped convs (groups=2: each half reads its own subnet's channels), and a GroupNorm of 2G groups over
    2C channels is exactly the two subnets' G-group norms side by side. Half the launches per pyramid
    level, same outputs as the head it was built from (weights copied, not shared). Same forward.

    CUDA ``.pt2`` engines of GroupNorm heads use it (``export.aoti``): on an H100
    (``benchmarks/tune_engine.py``, R50-FPN, fp16) it takes 0.1-0.15 ms of GPU time off a batch-1 call (half
    the GroupNorm kernels) and leaves batch 32 as it was (docs/PERFORMANCE.md, ninth session). Without
    norms (a folded per-level BatchNorm head) the grouped convs cost more than the launches they save:
    2.262 against 2.115 GPU ms per batch-1 call with the subnets apart (eighteenth session).
    """

    def __init__(self, head: RetinaNetHead | UnsharedHead) -> None:
        super().__init__()
        if isinstance(head, RetinaNetHead) and head.norm == "bn":
            raise ValueError("merge the UnsharedHead of a per-level BatchNorm head (unshare_level_norms)")
        self.num_classes, self.num_anchors = head.num_classes, head.num_anchors
        pairs = (
            zip(head.cls_towers, head.box_towers, strict=True)
            if isinstance(head, UnsharedHead)
            else [(head.cls_subnet, head.box_subnet)]
        )
        self.towers = nn.ModuleList(_merged_tower(cls, box) for cls, box in pairs)
        merges_convs = any(isinstance(m, nn.Conv2d) for m in self.towers[0].modules())
        self.split = head.cls_logits.in_channels if merges_convs else 0
        self.cls_logits, self.box_pred = head.cls_logits, head.box_pred

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls, box = [], []
        for level, f in enumerate(features):
            t = self.towers[level if len(self.towers) > 1 else 0](f)
            c, b = (t[:, : self.split], t[:, self.split :]) if self.split else (t, t)
            cls.append(self.cls_logits(c))
            box.append(self.box_pred(b))
        return cls, box


def _merged_tower(cls_subnet: nn.Module, box_subnet: nn.Module) -> nn.Sequential:
    """The two subnets' layers side by side as one Sequential (see :class:`MergedHead`)."""
    layers: list[nn.Module] = []
    first = True
    for cls_layer, box_layer in zip(cls_subnet.children(), box_subnet.children(), strict=True):
        if isinstance(cls_layer, nn.Conv2d):
            assert isinstance(box_layer, nn.Conv2d)
            layers.append(_merged_conv(cls_layer, box_layer, groups=1 if first else 2))
            first = False
        elif isinstance(cls_layer, nn.GroupNorm):
            assert isinstance(box_layer, nn.GroupNorm)
            layers.append(_merged_norm(cls_layer, box_layer))
        else:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@torch.no_grad()
def _merged_conv(a: nn.Conv2d, b: nn.Conv2d, groups: int) -> nn.Conv2d:
    out_channels = 2 * a.out_channels
    conv = nn.Conv2d(
        a.in_channels * groups, out_channels, 3, padding=1, groups=groups, bias=a.bias is not None
    )
    conv = conv.to(a.weight)
    conv.weight.copy_(torch.cat([a.weight, b.weight]))
    if conv.bias is not None and a.bias is not None and b.bias is not None:
        conv.bias.copy_(torch.cat([a.bias, b.bias]))
    return conv


@torch.no_grad()
def _merged_norm(a: nn.GroupNorm, b: nn.GroupNorm) -> nn.GroupNorm:
    norm = type(a)(2 * a.num_groups, 2 * a.num_channels, a.eps, a.affine).to(a.weight)
    if a.affine:
        norm.weight.copy_(torch.cat([a.weight, b.weight]))
        norm.bias.copy_(torch.cat([a.bias, b.bias]))
    return norm
