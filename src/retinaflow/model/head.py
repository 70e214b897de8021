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
