"""CUDA colour-jitter kernel against the PyTorch reference (run on the GPU machine).

The kernel rounds every float operation as the reference does, but sums each image's grey levels exactly
where the reference's float32 sum may round; the contrast mean can then differ in its last bits and move a
pixel value across an integer. So: at most 1 level apart, on a tiny share of the values, padding exactly
zero, identical reruns, and capturable in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from tests.ops.gpu import CUDA_KERNEL_TESTS

from retinaflow.ops import _reference
from retinaflow.ops.colour import colour_jitter
from retinaflow.ops.graph import CudaGraphRunner

pytestmark = CUDA_KERNEL_TESTS


def padded_batch(batch: int, height: int, width: int, seed: int):
    """Random images in random top-left corners (zeros elsewhere), their sizes and jitter factors."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.stack(
        [
            torch.randint(1, height + 1, (batch,), generator=g),
            torch.randint(1, width + 1, (batch,), generator=g),
        ],
        1,
    )
    sizes[0] = torch.tensor([height, width])  # one image fills its bucket
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)
    rows = torch.arange(height).view(1, 1, -1, 1) < sizes[:, 0].view(-1, 1, 1, 1)
    cols = torch.arange(width).view(1, 1, 1, -1) < sizes[:, 1].view(-1, 1, 1, 1)
    images = images * (rows & cols)
    factors = 0.6 + 0.8 * torch.rand(batch, 3, generator=g)  # color_jitter 0.4 draws in [0.6, 1.4]
    return images.cuda().contiguous(memory_format=torch.channels_last), sizes, factors


@pytest.mark.parametrize(
    ("batch", "height", "width"), [(1, 1, 1), (3, 7, 13), (16, 256, 384), (4, 800, 1344)]
)
def test_kernel_matches_the_reference(batch, height, width):
    images, sizes, factors = padded_batch(batch, height, width, seed=batch + height)
    got = colour_jitter(images, sizes, factors)
    want = _reference.colour_jitter(images, sizes.cuda(), factors.cuda())
    assert got.dtype == torch.uint8 and got.is_contiguous(memory_format=torch.channels_last)
    diff = (got.int() - want.int()).abs()
    assert diff.max().item() <= 1
    assert diff.ne(0).float().mean().item() < 1e-3
    for i, (h, w) in enumerate(sizes.tolist()):  # the padding stays zero
        assert got[i, :, h:].eq(0).all() and got[i, :, :, w:].eq(0).all()
    torch.testing.assert_close(colour_jitter(images, sizes, factors), got, rtol=0, atol=0)  # deterministic


def test_identity_factors_keep_the_image():
    images, sizes, _ = padded_batch(4, 64, 96, seed=5)
    ones = torch.ones(4, 3)
    torch.testing.assert_close(colour_jitter(images, sizes, ones), images, rtol=0, atol=0)


def test_kernel_replays_in_a_cuda_graph():
    images, sizes, factors = padded_batch(4, 128, 160, seed=7)
    sizes, factors = sizes.cuda(), factors.cuda()
    runner = CudaGraphRunner(colour_jitter, [images, sizes, factors])
    other, other_sizes, other_factors = padded_batch(4, 128, 160, seed=8)
    out = runner(other, other_sizes.cuda(), other_factors.cuda())
    torch.testing.assert_close(out, colour_jitter(other, other_sizes, other_factors), rtol=0, atol=0)
