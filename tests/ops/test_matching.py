"""The matching op's dispatch, schema and fake implementation on the CPU (the kernel: test_match_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from retinaflow.errors import ConfigError
from retinaflow.ops import _reference, matching


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(60, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 30], -1)
    gxy = torch.rand(2, 4, 2, generator=g) * 100
    boxes = torch.cat([gxy, gxy + 5 + torch.rand(2, 4, 2, generator=g) * 30], -1)
    labels = torch.tensor([[0, 1, -1, 2], [3, -1, -1, -1]])
    return anchors, boxes, labels


def test_cpu_tensors_use_the_reference_and_the_op_agrees() -> None:
    anchors, boxes, labels = _inputs()
    expected = _reference.match(anchors, boxes, labels, 0.5, 0.4, True)
    assert torch.equal(matching.match(anchors, boxes, labels, 0.5, 0.4, True), expected)
    op = torch.ops.retinaflow.match(anchors, boxes, labels, 0.5, 0.4, True)
    assert torch.equal(op, expected)
    assert (expected >= 0).any()


def test_cuda_backend_refuses_cpu_tensors() -> None:
    anchors, boxes, labels = _inputs()
    with pytest.raises(ConfigError, match="CUDA tensors"):
        matching.match(anchors, boxes, labels, 0.5, 0.4, True, backend="cuda")


def test_opcheck_schema_and_fake_on_cpu() -> None:
    anchors, boxes, labels = _inputs(1)
    torch.library.opcheck(torch.ops.retinaflow.match.default, (anchors, boxes, labels, 0.5, 0.4, False))
