"""ONNX export: checker, dynamic batch, parity with PyTorch in ONNX Runtime, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from retinaflow.config import Config, ExportConfig
from retinaflow.engine.checkpoint import save_checkpoint
from retinaflow.errors import CheckpointError, ConfigError
from retinaflow.export.onnx import ATOL, RTOL, export_onnx
from retinaflow.model.norm import FrozenBatchNorm2d
from retinaflow.model.retinanet import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config()
    cfg.model.backbone, cfg.model.num_classes, cfg.model.fpn_channels, cfg.model.head_convs = (
        "resnet18",
        3,
        32,
        1,
    )
    cfg.class_names = ["a", "b", "c"]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for m in model.modules():  # non-trivial frozen statistics, so folding them into the convs shows
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    save_checkpoint(
        path,
        {
            "arch": model.arch,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "class_names": cfg.class_names,
            "category_ids": [1, 2, 3],
            "iteration": 0,
        },
    )
    return path, model


def test_export_is_valid_and_matches_pytorch_at_several_batch_sizes(checkpoint, tmp_path):
    path, model = checkpoint
    out = export_onnx(path, tmp_path / "m.onnx", ExportConfig(height=128, width=256, opset=17))
    graph = onnx.load(str(out))
    assert graph.opset_import[0].version >= 17
    assert [o.name for o in graph.graph.output] == [f"{k}_p{i}" for k in ("cls", "box") for i in range(3, 8)]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("Mul") == 1  # the input normalisation; every frozen BN is folded into its conv
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model.eval()
    for batch in (1, 3):
        images = torch.rand(batch, 3, 128, 256) * 255
        with torch.no_grad():
            cls, box = model(images)
        got = session.run(None, {"images": images.numpy()})
        assert got[0].shape == (batch, 9 * 3, 16, 32) and got[5].shape == (batch, 9 * 4, 16, 32)
        for expected, actual in zip([*cls, *box], got, strict=True):
            np.testing.assert_allclose(actual, expected.numpy(), rtol=RTOL, atol=ATOL)


def test_export_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match="multiple of 128"):
        export_onnx(path, tmp_path / "m.onnx", ExportConfig(height=100, width=128))
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(path, tmp_path / "m.onnx", ExportConfig(height=128, width=128, opset=11))
    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(tmp_path / "none.pth", tmp_path / "m.onnx", ExportConfig(height=128, width=128))
