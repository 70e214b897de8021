from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch

from retinaflow.config import AnchorConfig, ModelConfig
from retinaflow.errors import ConfigError, DataError
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.head import UnsharedHead
from retinaflow.model.retinanet import (
    RetinaNet,
    build_model,
    flatten_outputs,
    fold_for_inference,
    pad_stem_input,
)

TINY = ModelConfig(backbone="resnet18", num_classes=3, fpn_channels=16, head_convs=1)
STRIDES = (8, 16, 32, 64, 128)


@pytest.fixture(scope="module")
def model() -> RetinaNet:
    torch.manual_seed(0)
    return build_model(TINY).eval()


def _images(batch: int = 1, h: int = 128, w: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)


def test_forward_bf16_autocast_128(model: RetinaNet) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cls, box = model(_images(2))
    a, c = 9, 3
    assert [tuple(t.shape) for t in cls] == [(2, a * c, 128 // s, 128 // s) for s in STRIDES]
    assert [tuple(t.shape) for t in box] == [(2, a * 4, 128 // s, 128 // s) for s in STRIDES]
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in cls + box)
    # a fresh model scores every anchor ~ prior
    assert torch.sigmoid(torch.cat([t.float().flatten() for t in cls])).mean().item() == pytest.approx(
        0.01, rel=0.1
    )
    flat_cls, flat_box = flatten_outputs(cls, box)
    anchors = generate_anchors(model.anchor_config, (128, 128))
    assert flat_cls.shape == (2, sum(x.shape[0] for x in anchors), c)
    assert flat_box.shape == (2, flat_cls.shape[1], 4)


def test_properties_and_arch(model: RetinaNet) -> None:
    assert model.num_classes == 3 and model.num_anchors == 9 and model.strides == STRIDES
    arch = model.arch
    assert json.loads(json.dumps(arch)) == arch  # plain values: storable in checkpoints and YAML
    assert arch["backbone"] == "resnet18" and arch["num_classes"] == 3
    assert arch["fpn_channels"] == 16 and arch["head_convs"] == 1
    assert arch["anchors"]["strides"] == list(STRIDES)
    with torch.device("meta"):
        same = build_model(dataclasses.replace(TINY, norm="frozen_bn", prior=0.05))
        other = build_model(dataclasses.replace(TINY, num_classes=4))
    assert same.arch == arch and other.arch != arch
    assert "norm" not in arch and arch["head_norm"] == "bn"  # the default: frozen BN, per-level BN head
    with torch.device("meta"):
        odtk = build_model(dataclasses.replace(TINY, head_norm="none"))
        gn = build_model(dataclasses.replace(TINY, norm="gn"))
    assert "norm" not in odtk.arch and "head_norm" not in odtk.arch  # as before model.norm existed
    assert gn.arch == {**arch, "norm": "gn"}


@pytest.mark.parametrize("head_norm", ["gn", "bn", "none"])
def test_fold_for_inference_keeps_the_outputs(head_norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, norm="bn", head_norm=head_norm, head_convs=2))
    images = torch.rand(2, 3, 96, 160) * 255
    with torch.no_grad():
        for _ in range(3):  # trained statistics in the backbone and, for "bn", in each level of the head
            model(images * torch.rand(1))
        want = model.eval()(images)
        got = fold_for_inference(model)(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.head, UnsharedHead) is (head_norm == "bn")
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_pad_stem_input_keeps_the_outputs(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, backbone=backbone)).eval()
    images = _images(2, 128, 192)
    with torch.no_grad():
        want = model(images)
        assert pad_stem_input(model, 3) is model and model.pad_channels == 0  # 3: left as it is
        got = pad_stem_input(model, 4)(images)
        assert model.normalize(images).shape[1] == 4 and not model.normalize(images)[:, 3].any()
    stems = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 4]
    assert len(stems) == 1 and not stems[0].weight[:, 3].any()
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one 3-channel convolution"):
        pad_stem_input(model, 4)  # already padded


def test_flatten_order_matches_anchor_layout() -> None:
    b, a, c, h, w = 2, 3, 4, 2, 5
    # value encodes (anchor, class, y, x) so positions can be checked after flattening
    cls = torch.arange(b * a * c * h * w, dtype=torch.float32).view(b, a * c, h, w)
    box = torch.arange(b * a * 4 * h * w, dtype=torch.float32).view(b, a * 4, h, w)
    flat_cls, flat_box = flatten_outputs([cls], [box])
    assert flat_cls.shape == (b, h * w * a, c)
    for y in range(h):
        for x in range(w):
            for k in range(a):
                n = (y * w + x) * a + k
                assert flat_cls[1, n].tolist() == [cls[1, k * c + j, y, x].item() for j in range(c)]
                assert flat_box[0, n].tolist() == [box[0, k * 4 + j, y, x].item() for j in range(4)]


def test_input_normalisation_uint8_float_and_channels_last(model: RetinaNet) -> None:
    images = _images(1, 128, 256)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(images), (images / 255.0 - mean) / std)
    with torch.no_grad():
        cls_u8, box_u8 = model(images)
        cls_f, box_f = model(images.float())
        cl_model = build_model(TINY).eval()
        cl_model.load_state_dict(model.state_dict())
        cl_model.to(memory_format=torch.channels_last)
        cls_cl, box_cl = cl_model(images.float().contiguous(memory_format=torch.channels_last))
    for x, y, z in zip(cls_u8 + box_u8, cls_f + box_f, cls_cl + box_cl, strict=True):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-4)
    assert not any("pixel" in k for k in model.state_dict())


def test_bad_config_and_input(model: RetinaNet) -> None:
    with pytest.raises(ConfigError, match="strides"):
        build_model(dataclasses.replace(TINY, anchors=AnchorConfig(strides=(8, 16, 32))))
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_model(dataclasses.replace(TINY, backbone="alexnet"))
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 128, 128))


def test_onnx_export_with_dynamic_shapes(model: RetinaNet) -> None:
    ort = pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    names = [f"cls_p{i}" for i in range(3, 8)] + [f"box_p{i}" for i in range(3, 8)]
    axes = {"images": {0: "batch", 2: "height", 3: "width"}} | {
        n: {0: "batch", 2: "h", 3: "w"} for n in names
    }
    torch.onnx.export(
        model, (_images().float(),), buffer, dynamo=False, opset_version=17,
        input_names=["images"], output_names=names, dynamic_axes=axes,
    )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    images = _images(2, 256, 128).float()
    outputs = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        cls, box = model(images)
    for got, want in zip(outputs, cls + box, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)
    assert outputs[0].shape == (2, 27, 32, 16) and math.prod(outputs[-1].shape[2:]) == 2
