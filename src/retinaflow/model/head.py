"""RetinaNet's classification and box subnets, shared over all pyramid levels."""

from __future__ import annotations

import math

import torch
from torch import nn

from retinaflow.errors import ConfigError
from retinaflow.model.norm import HEAD_NORMS, group_norm


def _subnet(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        if norm == "gn":
            layers.append(group_norm(channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Two subnets of ``num_convs`` x (conv3x3 [+ GroupNorm if ``norm="gn"``] + ReLU), then an output conv3x3.

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
        self.cls_subnet = _subnet(channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_subnet = _subnet(channels, num_convs, norm)
        self.box_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_logits.bias is not None:
            nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior) / prior))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls = [self.cls_logits(self.cls_subnet(f)) for f in features]
        box = [self.box_pred(self.box_subnet(f)) for f in features]
        return cls, box


class MergedHead(nn.Module):
    """Inference form of a :class:`RetinaNetHead`: both subnets as one tower of twice the channels.

    The first conv reads the shared input with both subnets' filters (C -> 2C), the later ones are
    grouped convs (groups=2: each half reads its own subnet's channels), and a GroupNorm of 2G groups over
    2C channels is exactly the two subnets' G-group norms side by side. Half the launches per pyramid
    level, same outputs as the head it was built from (weights copied, not shared). Same forward.

    CUDA ``.pt2`` engines use it (``export.aoti``): on an H100 (``benchmarks/tune_engine.py``, R50-FPN,
    GroupNorm head, fp16) it takes 0.1-0.15 ms of GPU time off a batch-1 call and leaves batch 32 as it
    was (docs/PERFORMANCE.md, ninth session).
    """

    def __init__(self, head: RetinaNetHead) -> None:
        super().__init__()
        self.num_classes, self.num_anchors = head.num_classes, head.num_anchors
        layers: list[nn.Module] = []
        first = True
        for cls_layer, box_layer in zip(head.cls_subnet, head.box_subnet, strict=True):
            if isinstance(cls_layer, nn.Conv2d):
                assert isinstance(box_layer, nn.Conv2d)
                layers.append(_merged_conv(cls_layer, box_layer, groups=1 if first else 2))
                first = False
            elif isinstance(cls_layer, nn.GroupNorm):
                assert isinstance(box_layer, nn.GroupNorm)
                layers.append(_merged_norm(cls_layer, box_layer))
            else:
                layers.append(nn.ReLU(inplace=True))
        self.tower = nn.Sequential(*layers)
        self.split = 0 if first else head.cls_logits.in_channels
        self.cls_logits, self.box_pred = head.cls_logits, head.box_pred

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls, box = [], []
        for f in features:
            t = self.tower(f)
            c, b = (t[:, : self.split], t[:, self.split :]) if self.split else (t, t)
            cls.append(self.cls_logits(c))
            box.append(self.box_pred(b))
        return cls, box


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
