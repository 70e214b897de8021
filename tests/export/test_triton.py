"""Triton model repository: config.pbtxt parses with Triton's own ModelConfig protobuf and matches the
exported engine's inputs and outputs."""

from __future__ import annotations

import onnx
import pytest
from google.protobuf import text_format

from retinaflow.cli import main
from retinaflow.errors import ConfigError
from retinaflow.export.api import Exported
from retinaflow.export.spec import EngineSpec
from retinaflow.export.triton import model_config

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

ONNX_TYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT64: "TYPE_INT64"}
ONNX_TYPES[onnx.TensorProto.FLOAT] = "TYPE_FP32"


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_triton_repository_for_an_onnx_export_matches_the_model(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    repo = tmp_path / "repo"
    args = ["export", str(path), str(tmp_path / "m.onnx"), "--batch", "1", "4"]
    assert main([*args, "--triton-repo", str(repo), "--triton-name", "det"]) == 0
    assert (repo / "det" / "1" / "model.onnx").is_file()
    config = parse((repo / "det" / "config.pbtxt").read_text())
    assert (config.name, config.platform, config.max_batch_size) == ("det", "onnxruntime_onnx", 4)
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4]
    graph = onnx.load(str(repo / "det" / "1" / "model.onnx")).graph
    for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [t.name for t in actual]
        for d, a in zip(declared, actual, strict=True):
            dtype = model_config_pb2.DataType.Name(d.data_type)
            assert dtype == ONNX_TYPES[a.type.tensor_type.elem_type]
            shape = [x.dim_value for x in a.type.tensor_type.shape.dim[1:]]
            assert list(d.reshape.shape if d.HasField("reshape") else d.dims) == shape


def test_triton_config_for_a_pt2_uses_the_python_backend_and_needs_batch_from_1():
    spec = EngineSpec("pt2", 800, 1344, 1, 32, "fp16")
    config = parse(model_config(Exported(path=None, spec=spec, device="cuda"), "r50", 100))  # type: ignore[arg-type]
    assert config.backend == "python" and config.max_batch_size == 32
    assert list(config.input[0].dims) == [3, 800, 1344]
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    with pytest.raises(ConfigError, match="--batch 1 32"):
        model_config(
            Exported(path=None, spec=EngineSpec("onnx", 64, 64, 2, 32, "fp32"), device="cpu"), "x", 1
        )  # type: ignore[arg-type]
