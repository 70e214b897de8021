"""The public wrappers on the CPU: the reference through the op, input validation, postprocess chaining."""

from __future__ import annotations

import pytest
import torch
from tests.ops.oracle import GRID_THRESH, random_heads

from retinaflow.config import Config, InferConfig
from retinaflow.errors import ConfigError
from retinaflow.ops import _ext, _library, _reference, boxes
from retinaflow.ops.detections import Detections

SHAPES = [(6, 8), (3, 4)]


@pytest.fixture
def heads():
    cls, box, anchors = random_heads(2, SHAPES, 3, 4, seed=0, mean=-1.0)
    return cls, box, anchors, torch.tensor([[40, 60], [48, 64]])


@pytest.fixture
def no_kernels(monkeypatch):
    """The kernels must not be touched: any attempt to load them fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("CUDA kernels requested for CPU tensors")

    monkeypatch.setattr(_ext, "load", fail)


def test_cpu_tensors_use_the_reference(heads, no_kernels):
    cls, box, anchors, sizes = heads
    got = boxes.decode_detections(cls, box, anchors, sizes, GRID_THRESH, 20)
    ref = _reference.decode(cls, box, anchors, sizes, GRID_THRESH, 20)
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)


def test_postprocess_chains_decode_and_nms(heads, no_kernels):
    cls, box, anchors, sizes = heads
    cfg = InferConfig(score_thresh=GRID_THRESH, top_n=30, nms_iou=0.5, max_det=15)
    d = boxes.postprocess(cls, box, anchors, sizes, cfg)
    s, b, c = _reference.decode(cls, box, anchors, sizes, cfg.score_thresh, cfg.top_n)
    ref = Detections(*_reference.nms(s, b, c, cfg.nms_iou, cfg.max_det))
    assert d.scores.shape == (2, 15) and d.counts.shape == (2,)
    for name in ("scores", "boxes", "classes", "counts"):
        assert torch.equal(getattr(d, name), getattr(ref, name))
    assert (d.counts > 0).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, b, a, s: (c, b[:1], a, s), "as many box heads"),
        (lambda c, b, a, s: (c, b, [x[:-1] for x in a], s), "anchors must be"),
        (lambda c, b, a, s: (c, [x[:, :, :-1] for x in b], a, s), "does not match class head"),
        (lambda c, b, a, s: (c, b, a, s[:1]), "sizes must be"),
        (lambda c, b, a, s: ([x[:, :-1] for x in c], b, a, s), "not a multiple of A"),
        (lambda c, b, a, s: ([], [], [], s), "pyramid levels"),
    ],
)
def test_decode_rejects_mismatched_inputs(heads, change, message):
    cls, box, anchors, sizes = change(*heads)
    with pytest.raises(ConfigError, match=message):
        boxes.decode_detections(cls, box, anchors, sizes, 0.05, 10)


@pytest.mark.parametrize(
    ("thresh", "top_n"), [(-0.1, 10), (1.0, 10), (0.05, 0), (0.05, _library.MAX_TOP_N + 1)]
)
def test_decode_rejects_bad_settings(heads, thresh, top_n):
    cls, box, anchors, sizes = heads
    with pytest.raises(ConfigError):
        boxes.decode_detections(cls, box, anchors, sizes, thresh, top_n)


def test_nms_rejects_bad_shapes_and_settings():
    s, b, c = torch.rand(2, 5), torch.rand(2, 5, 4), torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ConfigError, match="nms needs"):
        boxes.batched_nms(s, b[:, :4], c, 0.5, 10)
    with pytest.raises(ConfigError, match=r"infer.nms_iou must be in \[0, 1\]"):  # checked by the config
        InferConfig(nms_iou=1.5)
    with pytest.raises(ConfigError, match=r"infer\.max_det"):
        Config().override(["infer.max_det=0"])
