"""The plugin core's workspace query and launch on the GPU (no TensorRT): same results as the PyTorch ops.

A test-only binding (core_binding.cpp) drives kernels/tensorrt/plugin_core exactly as the TensorRT adapter
does — contiguous buffers, int32 integers, workspace sized by the core's query — and the outputs must equal
``torch.ops.retinaflow`` (which calls the same C API) up to the integer type.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.ops.oracle import GRID_THRESH, random_heads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[3]
SHAPES = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]


@pytest.fixture(scope="module")
def core():
    from torch.utils import cpp_extension

    from retinaflow.ops import _ext

    _ext.load()
    k = ROOT / "kernels"
    return cpp_extension.load(
        name="retinaflow_plugin_core_test",
        sources=[str(p) for p in (k / "tensorrt/plugin_core.cpp", k / "decode.cu", k / "nms.cu")]
        + [str(Path(__file__).with_name("core_binding.cpp"))],
        extra_include_paths=[str(k)],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3"],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_through_core_matches_torch_op(core, dtype):

    cls, box, anchors = random_heads(3, SHAPES, 9, 20, seed=5, dtype=dtype)
    cls, box, anchors = ([t.cuda() for t in ts] for ts in (cls, box, anchors))
    sizes = torch.tensor([[96, 160], [80, 150], [90, 100]], dtype=torch.int32, device="cuda")
    scores, boxes, classes, bytes_ = core.decode(cls, box, anchors, sizes, GRID_THRESH, 100, 0)
    ref = torch.ops.retinaflow.decode(cls, box, anchors, sizes.long(), GRID_THRESH, 100, 0)
    assert int(bytes_) > 0
    assert classes.dtype == torch.int32
    assert torch.equal(classes.long(), ref[2])
    torch.testing.assert_close(scores, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(boxes, ref[1], rtol=0, atol=0)


def test_nms_through_core_matches_torch_op(core):
    from retinaflow.ops import _ext

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(4, 500, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 1 + torch.rand(4, 500, 2, generator=g) * 80], -1).cuda()
    scores = torch.rand(4, 500, generator=g).cuda()
    classes = torch.randint(-1, 5, (4, 500), generator=g).cuda()
    got = core.nms(scores, boxes, classes.int(), 0.5, 100)
    ref = _ext.nms(scores, boxes, classes, 0.5, 100)
    assert torch.equal(got[3].long(), ref.counts) and torch.equal(got[2].long(), ref.classes)
    torch.testing.assert_close(got[0], ref.scores, rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref.boxes, rtol=0, atol=0)
