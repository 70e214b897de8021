from __future__ import annotations

import math

import torch
from torchvision.models.detection._utils import BoxCoder

from retinaflow.model.box_coder import encode
from retinaflow.ops._reference import decode_deltas


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 500
    wh = torch.rand(n, 2, generator=generator) * 190 + 10  # size ratios < 1000/16: no clamping
    return torch.cat([xy, xy + wh], dim=1)


def test_known_values() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 5.0, 25.0, 15.0]])  # centre (15, 10), size 20 x 10
    torch.testing.assert_close(encode(anchors, gt), torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]]))


def test_round_trip_and_torchvision_parity() -> None:
    g = torch.Generator().manual_seed(0)
    anchors, gt = _random_boxes(1000, g), _random_boxes(1000, g)
    deltas = encode(anchors, gt)
    torch.testing.assert_close(decode_deltas(anchors, deltas), gt, atol=1e-3, rtol=1e-5)
    tv = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(deltas, tv.encode_single(gt, anchors), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        decode_deltas(anchors, deltas), tv.decode_single(deltas, anchors), atol=1e-3, rtol=1e-5
    )


def test_leading_dims_broadcast() -> None:
    g = torch.Generator().manual_seed(1)
    anchors = _random_boxes(50, g)  # (N, 4)
    gt = torch.stack([_random_boxes(50, g), _random_boxes(50, g)])  # (B, N, 4)
    deltas = encode(anchors[None], gt)
    assert deltas.shape == (2, 50, 4)
    torch.testing.assert_close(deltas[1], encode(anchors, gt[1]))
    torch.testing.assert_close(decode_deltas(anchors[None], deltas), gt, atol=1e-3, rtol=1e-5)
