"""Images in pad-stride blocks (engine/blocks.py): a view of the same memory, flattened back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retinaflow.engine.blocks import BlockInput, to_blocks


def test_blocks_are_a_view_that_the_wrapper_flattens_back_to_the_same_images():
    images = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    blocks = to_blocks(images, 32)
    assert blocks.shape == (2, 3, 2, 32, 3, 32)
    assert blocks.data_ptr() == images.data_ptr()  # no copy
    seen = BlockInput(nn.Identity(), 32)(blocks)
    assert isinstance(seen, torch.Tensor)
    assert torch.equal(seen, images)
    assert seen.is_contiguous(memory_format=torch.channels_last) and seen.data_ptr() == images.data_ptr()


def test_the_wrapper_adds_no_parameters():
    net = nn.Conv2d(3, 4, 3)
    assert list(BlockInput(net, 32).parameters()) == list(net.parameters())


def test_a_batch_not_made_of_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="not made of whole 32-pixel blocks"):
        to_blocks(torch.zeros(1, 3, 64, 80), 32)
