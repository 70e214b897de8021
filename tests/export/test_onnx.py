"""ONNX export: checker, dynamic batch, parity with PyTorch in ONNX Runtime, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from retinaflow.config import ExportConfig
from retinaflow.errors import CheckpointError, ConfigError
from retinaflow.export.onnx import ATOL, RTOL, export_onnx


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_network_only_export_is_valid_and_matches_pytorch_at_several_batch_sizes(checkpoint, tmp_path):
    path, model = checkpoint
    cfg = ExportConfig(height=128, width=256, opset=17, postprocess=False)
    out = export_onnx(path, tmp_path / "m.onnx", cfg)
    graph = onnx.load(str(out))
    assert graph.opset_import[0].version >= 17
    assert [o.name for o in graph.graph.output] == [f"{k}_p{i}" for k in ("cls", "box") for i in range(3, 8)]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = [node.op_type for node in graph.graph.node]
    # Every frozen BN is folded into its conv: the Muls left are the input normalisation and one per
    # GroupNorm of the head (this checkpoint's head norm; shared weights, run on each of the 5 levels).
    head_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.head.modules()) * 5
    assert "BatchNormalization" not in ops and ops.count("Mul") == 1 + head_norms
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


def test_per_level_batchnorm_head_exports_as_plain_convolutions(tiny_bn_head_checkpoint, tmp_path):
    """``model.head_norm=bn``: each level's norms folded into its own copy of the head's convolutions, so
    the graph holds no normalisation at all (the one Mul is the input's), and matches PyTorch."""
    path, model = tiny_bn_head_checkpoint
    out = export_onnx(path, tmp_path / "bn.onnx", ExportConfig(height=128, width=256, postprocess=False))
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Mul") == 1
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 128, 256) * 255
    with torch.no_grad():
        cls, box = model(images)
    got = session.run(None, {"images": images.numpy()})
    for expected, actual in zip([*cls, *box], got, strict=True):
        np.testing.assert_allclose(actual, expected.numpy(), rtol=RTOL, atol=ATOL)


def test_export_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match="multiples of 32"):
        export_onnx(path, tmp_path / "m.onnx", ExportConfig(height=100, width=128))
    with pytest.raises(ConfigError, match=r"bf16 is not available for \.onnx"):
        export_onnx(path, tmp_path / "m.onnx", ExportConfig(precision="bf16"))
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(path, tmp_path / "m.onnx", ExportConfig(height=128, width=128, opset=11))
    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(tmp_path / "none.pth", tmp_path / "m.onnx", ExportConfig(height=128, width=128))
