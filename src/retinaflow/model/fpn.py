"""Feature pyramid (Lin et al., FPN): C3, C4, C5 -> P3..P7, all with the same channel count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """RetinaNet's pyramid, as in the paper and ODTK.

    P5..P3: lateral 1x1 convs, nearest-neighbour top-down upsampling added level by level, then a 3x3
    output conv per level. P6 = 3x3 stride-2 conv on C5; P7 = 3x3 stride-2 conv on relu(P6).

    forward([C3, C4, C5]) with strides 8, 16, 32 -> [P3, P4, P5, P6, P7], each (B, out_channels, H_l, W_l)
    with H_l = ceil(H / stride_l) for an input of H x W pixels (exact when H, W are multiples of 128).
    """

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int = 256) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        self.out_channels = out_channels
        self.lateral3 = nn.Conv2d(c3, out_channels, 1)
        self.lateral4 = nn.Conv2d(c4, out_channels, 1)
        self.lateral5 = nn.Conv2d(c5, out_channels, 1)
        self.output3 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.output4 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.output5 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.p6 = nn.Conv2d(c5, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision FPN / ODTK initialisation
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = features
        lat5 = self.lateral5(c5)
        # Upsample to the lateral's exact size (not scale_factor=2) so odd sizes still line up.
        lat4 = self.lateral4(c4) + F.interpolate(lat5, size=c4.shape[-2:], mode="nearest")
        lat3 = self.lateral3(c3) + F.interpolate(lat4, size=c3.shape[-2:], mode="nearest")
        p6 = self.p6(c5)
        p7 = self.p7(F.relu(p6))
        return [self.output3(lat3), self.output4(lat4), self.output5(lat5), p6, p7]
