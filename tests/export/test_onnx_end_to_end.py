"""End-to-end ONNX (network + decode + NMS in standard ONNX ops): I/O, metadata, and the same detections
as the PyTorch path on the synthetic val set in ONNX Runtime (CPU)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from retinaflow.cli import main
from retinaflow.config import ExportConfig
from retinaflow.engine.infer import infer
from retinaflow.errors import ConfigError
from retinaflow.export.engine_infer import infer_engine
from retinaflow.export.engines import EngineError, open_engine
from retinaflow.export.onnx import export_onnx, read_metadata
from retinaflow.export.onnx_runtime import infer_onnx
from retinaflow.export.parity import SCORE_ATOL


def assert_same_results(expected: list[dict], got: list[dict]) -> None:
    """COCO results agree: same images and classes in order, scores within 1e-4, boxes 1e-3 relative."""
    assert len(got) == len(expected) > 0
    for e, g in zip(expected, got, strict=True):
        assert (g["image_id"], g["category_id"]) == (e["image_id"], e["category_id"])
        assert g.get("file_name") == e.get("file_name")  # engines name each detection's file too
        assert abs(g["score"] - e["score"]) <= SCORE_ATOL
        for a, b in zip(e["bbox"], g["bbox"], strict=True):
            assert abs(a - b) <= 0.01 + 1e-3 * abs(a)  # the JSON rounds boxes to 0.01 px


@pytest.fixture(scope="module")
def onnx_engine(tiny_checkpoint, tmp_path_factory):
    path, _ = tiny_checkpoint
    out = tmp_path_factory.mktemp("onnx") / "e2e.onnx"
    return export_onnx(path, out, ExportConfig(min_batch=1, max_batch=4))


def test_end_to_end_io_and_metadata(onnx_engine, tiny_checkpoint):
    graph = onnx.load(str(onnx_engine))
    inputs = {i.name: i.type.tensor_type for i in graph.graph.input}
    assert list(inputs) == ["images", "sizes"]
    assert inputs["images"].elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inputs["images"].shape.dim] == ["batch", 3, 128, 128]
    outputs = {o.name: o.type.tensor_type for o in graph.graph.output}
    assert list(outputs) == ["num_detections", "boxes", "scores", "classes"]
    assert [d.dim_param or d.dim_value for d in outputs["boxes"].shape.dim] == ["batch", 100, 4]
    assert "NonMaxSuppression" in {n.op_type for n in graph.graph.node}
    meta = read_metadata(onnx_engine)
    assert meta["class_names"] == ["a", "b", "c"] and meta["category_ids"] == [1, 2, 3]
    assert (meta["input_height"], meta["input_width"], meta["max_batch"]) == (128, 128, 4)
    assert meta["infer"]["nms_iou"] == 0.5 and len(meta["checkpoint_sha256"]) == 64
    assert meta["pixel_mean"][0] == pytest.approx(123.675)


def test_end_to_end_detections_match_pytorch_on_synthetic_val(
    onnx_engine, tiny_checkpoint, synth_small, tmp_path
):
    path, _ = tiny_checkpoint
    images, ann = synth_small.val_images, synth_small.val_annotations
    infer(path, images, tmp_path / "torch.json", annotations=ann, device="cpu")
    result = infer_engine(onnx_engine, images, tmp_path / "onnx.json", ann, overrides={"batch": 4})
    assert result is not None
    expected = json.loads((tmp_path / "torch.json").read_text())
    assert_same_results(expected, json.loads((tmp_path / "onnx.json").read_text()))


def test_engine_inference_takes_only_the_settings_an_engine_leaves_open(onnx_engine, synth_small, tmp_path):
    images = synth_small.val_images
    with pytest.raises(ConfigError, match=r"infer\.score_thresh"):
        infer_engine(onnx_engine, images, tmp_path / "a.json", overrides={"score_thresh": 0.3})
    with pytest.raises(ConfigError, match=r"data\.loader must be one of"):
        infer_engine(onnx_engine, images, tmp_path / "b.json", overrides={"loader": "pil"})
    infer_engine(onnx_engine, images, tmp_path / "c.json", overrides={"loader": "torch", "batch": 3})
    assert json.loads((tmp_path / "c.json").read_text())


def test_network_only_onnx_detections_match_pytorch_on_synthetic_val(tiny_checkpoint, synth_small, tmp_path):
    # infer_onnx (the pipeline's evaluate step): same data settings, file names and results as `infer`
    path, _ = tiny_checkpoint
    net = export_onnx(path, tmp_path / "net.onnx", ExportConfig(postprocess=False))
    images, ann = synth_small.val_images, synth_small.val_annotations
    torch_result = infer(path, images, tmp_path / "torch.json", annotations=ann, device="cpu")
    result = infer_onnx(net, path, images, ann, tmp_path / "onnx.json")
    expected = json.loads((tmp_path / "torch.json").read_text())
    assert_same_results(expected, json.loads((tmp_path / "onnx.json").read_text()))
    assert torch_result is not None and abs(result.map - torch_result.map) < 1e-3


def test_cli_export_default_size_comes_from_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    # regression: `retinaflow export model.pth model.onnx` failed on its own default size (800x1344)
    path, _ = tiny_checkpoint
    assert main(["export", str(path), str(tmp_path / "m.onnx"), "--batch", "2"]) == 0
    meta = read_metadata(tmp_path / "m.onnx")
    assert (meta["input_height"], meta["input_width"], meta["min_batch"], meta["max_batch"]) == (
        128,
        128,
        2,
        2,
    )


def test_network_only_onnx_is_refused_as_an_engine(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    out = export_onnx(path, tmp_path / "net.onnx", ExportConfig(postprocess=False))
    with pytest.raises(EngineError, match="network-only"):
        open_engine(out)


def test_onnx_engine_checks_batch_and_size(onnx_engine, tmp_path):
    engine = open_engine(onnx_engine)
    with pytest.raises(ConfigError, match=r"outside e2e.onnx's range 1\.\.4: use --batch 4"):
        engine(torch.zeros(5, 3, 128, 128, dtype=torch.uint8), torch.full((5, 2), 128))
    with pytest.raises(ConfigError, match="re-export with --size 64 128"):
        engine(torch.zeros(1, 3, 64, 128, dtype=torch.uint8), torch.full((1, 2), 64))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"PK\x03\x04 not onnx")
    with pytest.raises(EngineError, match="not a loadable ONNX model"):
        open_engine(garbage)


def test_infer_on_an_engine_refuses_settings_fixed_at_export(onnx_engine, tmp_path, capsys):
    args = ["infer", str(onnx_engine), "--images", str(tmp_path), "--output", str(tmp_path / "d.json")]
    assert main([*args, "--score-thresh", "0.3"]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--score-thresh is fixed in the engine" in err[0]
