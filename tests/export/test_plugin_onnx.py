"""Plugin-flavour ONNX: the Decode/NMS node contract, run in ONNX Runtime with Python ops (reference)."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import helper

from retinaflow.config import Config, ExportConfig, InferConfig
from retinaflow.engine.infer import detect, load_model
from retinaflow.export import plugin_onnx as po
from retinaflow.model.anchors import generate_anchors
from retinaflow.ops.boxes import postprocess

pytest.importorskip("onnxruntime_extensions", reason="needs onnxruntime-extensions (dev extra)")
from retinaflow.export import plugin_ort

INFER = InferConfig(score_thresh=0.02, top_n=60, nms_iou=0.5, max_det=25)
H, W = 128, 256


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    ckpt, _ = tiny_checkpoint
    folder = tmp_path_factory.mktemp("plugin_onnx")
    return ckpt, po.export_plugin_onnx(ckpt, folder / "m.onnx", ExportConfig(height=H, width=W), INFER)


def test_nodes_carry_the_plugin_fields_and_identity(exported):
    decode, nms = po.find_plugin_nodes(onnx.load(str(exported[1])))
    types = {onnx.AttributeProto.FLOAT: "float32", onnx.AttributeProto.INT: "int32"}
    for node, spec in ((decode, po.DECODE), (nms, po.NMS)):
        attrs = {a.name: a for a in node.attribute}
        assert node.domain == po.DOMAIN
        assert helper.get_attribute_value(attrs["plugin_namespace"]) == po.PLUGIN_NAMESPACE.encode()
        assert helper.get_attribute_value(attrs["plugin_version"]) == po.PLUGIN_VERSION.encode()
        fields = [(a.name, types[a.type]) for a in node.attribute if a.name not in po.PARSER_ATTRIBUTES]
        assert sorted(fields) == sorted(spec.fields)  # ONNX attributes are looked up by name
        assert len(node.output) == len(spec.outputs)
    assert len(decode.input) == len(po.decode_input_names(5)) and decode.input[-1] == "sizes"
    assert po.node_fields(decode) == {"score_thresh": pytest.approx(0.02), "top_n": 60, "capacity": 0}
    assert po.node_fields(nms) == {"iou_threshold": pytest.approx(0.5), "max_det": 25}


def test_onnx_runtime_matches_the_pytorch_path(exported, tmp_path):
    ckpt, path = exported
    model = onnx.load(str(path))
    heads = [f"{k}_p{i}" for k in ("cls", "box") for i in range(3, 8)]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in heads)  # expose the heads too
    onnx.save(model, str(tmp_path / "with_heads.onnx"))
    sess = plugin_ort.session(tmp_path / "with_heads.onnx")
    torch.manual_seed(1)
    images = torch.rand(2, 3, H, W) * 255
    sizes = torch.tensor([[H, W], [100, 200]])
    out = sess.run(None, {"images": images.numpy(), "sizes": sizes.int().numpy()})
    got = [torch.from_numpy(o) for o in out[:4]]
    assert got[0].shape == (2, 25) and got[1].shape == (2, 25, 4) and got[2].dtype == torch.int32
    assert int(got[3].min()) > 0

    # Exact: the plugin nodes == the PyTorch post-processing on the same head outputs.
    cls, box = [torch.from_numpy(o) for o in out[4:9]], [torch.from_numpy(o) for o in out[9:]]
    anchors = generate_anchors(
        Config.from_dict(torch.load(ckpt, weights_only=False)["config"]).model.anchors, (H, W)
    )
    ref = postprocess(cls, box, anchors, sizes, INFER)
    assert torch.equal(got[3].long(), ref.counts) and torch.equal(got[2].long(), ref.classes)
    assert torch.equal(got[0], ref.scores) and torch.equal(got[1], ref.boxes)

    # End to end: PyTorch network + post-processing (ONNX Runtime's convolutions differ by ~1e-5).
    net, config, _ = load_model(ckpt, torch.device("cpu"))
    config.infer = INFER
    dets = detect(net, images, sizes, config)
    assert torch.equal(dets.counts, ref.counts)
    same = dets.classes == ref.classes
    assert same.float().mean() > 0.95
    torch.testing.assert_close(dets.scores[same], ref.scores[same], rtol=0, atol=1e-4)
    torch.testing.assert_close(dets.boxes[same], ref.boxes[same], rtol=0, atol=1e-2)


def test_graph_without_plugin_nodes_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "net.onnx"))
    with pytest.raises(po.MissingPluginNodes, match=r"no retinaflow\.Decode"):
        plugin_ort.session(tmp_path / "net.onnx")
