"""Padded images handed to a compiled network in whole blocks of the pad stride (compile_shapes=blocks).

Compiled once for several padded shapes, the network sees symbolic height and width H and W, and every
feature map's size is an expression of them: ``((H - 1)//2) + 1`` after the stem, nested once more per
stride-2 layer. Dynamo's tracing does sympy arithmetic on these (and guards on them), and inductor's
kernels index with them; strides it cannot prove multiples of 16 get no vectorised loads
(pytorch/pytorch#177061).

Every padded shape is a multiple of the pad stride S (``data.pad_stride``, 32: the backbone's stride). So
the batch goes in as a view (B, C, H/S, S, W/S, S), symbolic in H/S and W/S only, and is flattened back
inside the graph: the backbone's and P3-P5's sizes become exact multiples (H/4 = 8·h, ..., H/32 = h for
S = 32), strides of 16·h·w·C. On the default network this traces with 15 shape guards instead of 41.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockInput(nn.Module):
    """Runs ``net`` on images given in blocks: (B, C, h, block, w, block) → ``net`` of (B, C, h·block,
    w·block), the same memory (a view: channels_last stays channels_last). Holds no parameters of its own:
    ``net``'s state dict and parameters are the model's."""

    def __init__(self, net: nn.Module, block: int) -> None:
        super().__init__()
        self.net, self.block = net, block

    def forward(self, blocks: torch.Tensor) -> object:
        b, c, h, _, w, _ = blocks.shape
        return self.net(blocks.reshape(b, c, h * self.block, w * self.block))


def to_blocks(images: torch.Tensor, block: int) -> torch.Tensor:
    """(B, C, H, W) → the view (B, C, H/block, block, W/block, block), its block counts marked dynamic for
    ``torch.compile`` (one graph for every padded shape). Raises ValueError if H or W is not a multiple of
    ``block``."""
    height, width = images.shape[-2:]
    if height % block or width % block:
        raise ValueError(f"a padded batch of {height}x{width} is not made of whole {block}-pixel blocks")
    blocks = images.unflatten(2, (height // block, block)).unflatten(4, (width // block, block))
    torch._dynamo.maybe_mark_dynamic(blocks, 2)
    torch._dynamo.maybe_mark_dynamic(blocks, 4)
    return blocks
