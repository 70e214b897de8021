"""``retinaflow export --precision int8``: ModelOpt calibration, Q/DQ end-to-end ONNX run in ONNX Runtime
(CPU) against fp32, and the Q/DQ plugin-flavour ONNX a TensorRT .plan is built from (everything but the
TensorRT build call). Skipped when nvidia-modelopt (the ``quantize`` extra) is not installed.
"""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
from tests.export.lowered import compare_onnx, sharpen, val_batch
from tests.test_cli import assert_one_line_error

from retinaflow.cli import main
from retinaflow.config import ExportConfig
from retinaflow.errors import ConfigError
from retinaflow.export import plugin_onnx as po
from retinaflow.export import tensorrt
from retinaflow.export.onnx import read_metadata
from retinaflow.export.quantize import CalibrationError

pytest.importorskip(
    "modelopt.torch.quantization", reason="needs nvidia-modelopt (pip install 'retinaflow[quantize]')"
)


def calibration(synth, n: int = 8) -> list[str]:
    return [
        "--calibration-images",
        str(n),
        "--calibration-data",
        str(synth.train_images),
        str(synth.train_annotations),
    ]


def test_int8_onnx_runs_in_onnx_runtime_close_to_fp32(tiny_checkpoint, synth_small, tmp_path):
    ckpt = sharpen(tiny_checkpoint[0], tmp_path / "sharp.pth")
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert main(["export", str(ckpt), str(fp32), "--batch", "1", "8"]) == 0
    argv = [
        "export",
        str(ckpt),
        str(int8),
        "--batch",
        "1",
        "8",
        "--precision",
        "int8",
        *calibration(synth_small),
    ]
    assert main(argv) == 0
    ops = Counter(n.op_type for n in onnx.load(str(int8)).graph.node)
    assert ops["QuantizeLinear"] >= ops["Conv"] > 20  # every convolution's input and weight
    meta = read_metadata(int8)
    assert meta["precision"] == "int8"
    assert meta["int8_calibration"]["images"] == 8 and not meta["int8_calibration"]["keep_head"]
    # Measured (8 calibration images; random weights with 10x class logits, which magnify the int8 error):
    # with the fixture's GroupNorm head 264 of the 296 detections scoring >= 0.4 found (same class,
    # IoU >= 0.9), scores within 0.090 (without head norm: 144 of 158, 0.048).
    total, hits, score_diff, _ = compare_onnx(fp32, int8, synth_small.val_images, synth_small.val_annotations)
    assert total >= 50 and hits >= 0.85 * total
    assert score_diff <= 0.12


def test_int8_plugin_onnx_is_the_qdq_network_then_float_plugins(tiny_checkpoint, synth_small, tmp_path):
    pytest.importorskip("onnxruntime_extensions", reason="needs onnxruntime-extensions (dev extra)")
    from retinaflow.export import plugin_ort

    data = (str(synth_small.train_images), str(synth_small.train_annotations))
    cfg = ExportConfig(
        precision="int8",
        calibration_images=8,
        calibration_data=data,
        int8_keep_head=True,
        height=128,
        width=128,
    )
    path = po.export_plugin_onnx(tiny_checkpoint[0], tmp_path / "m.plugin.onnx", cfg)
    model = onnx.load(str(path))
    decode, _ = po.find_plugin_nodes(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    heads = [producers[i] for i in decode.input if i in producers]
    assert len(heads) == 10 and all(n.op_type == "Conv" for n in heads)  # float head maps into Decode
    for conv in heads:  # --int8-keep-head: the last convolutions read float activations and weights
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in conv.input)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 20
    assert read_metadata(path)["precision"] == "int8"
    images, sizes = val_batch(synth_small.val_images, synth_small.val_annotations, 128)
    feed = {"images": images.astype("float32"), "sizes": sizes.astype("int32")}
    scores, _, _, counts = plugin_ort.session(path).run(None, feed)
    assert scores.shape == (len(images), 100) and int(counts.min()) > 0  # ONNX Runtime runs it: detections


def test_plan_export_builds_from_the_qdq_plugin_onnx(tiny_checkpoint, synth_small, tmp_path, monkeypatch):
    built, build_engine = {}, tensorrt.build_engine

    def fake_build(onnx_path, plan_path, cfg):  # the TensorRT build call itself: tensorrt-marked tests
        built.update(path=onnx_path, precision=cfg.precision)
        return plan_path

    monkeypatch.setattr(tensorrt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt, "build_engine", fake_build)
    data = (str(synth_small.train_images), str(synth_small.train_annotations))
    cfg = ExportConfig(precision="int8", calibration_images=4, calibration_data=data, height=128, width=128)
    tensorrt.export_plan(tiny_checkpoint[0], tmp_path / "m.plan", cfg)
    assert built["precision"] == "int8" and built["path"] == tmp_path / "m.plugin.onnx"
    qdq = onnx.load(str(built["path"]))
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    with pytest.raises(ConfigError, match="has Q/DQ nodes but the engine is to be fp16"):
        build_engine(built["path"], tmp_path / "x.plan", ExportConfig(precision="fp16"))
    tensorrt.export_plan(
        tiny_checkpoint[0], tmp_path / "h.plan", ExportConfig(precision="fp16", height=128, width=128)
    )
    assert built["precision"] == "fp16"  # fp16 plans cast the fp32 plugin ONNX (to_float16)
    fp32 = onnx.load(str(tmp_path / "h.plugin.onnx"))
    assert not any(n.op_type == "QuantizeLinear" for n in fp32.graph.node)
    with pytest.raises(ConfigError, match="has no Q/DQ nodes but the engine is to be int8"):
        build_engine(tmp_path / "h.plugin.onnx", tmp_path / "x.plan", ExportConfig(precision="int8"))


def test_int8_calibration_errors_are_one_line(tiny_checkpoint, synth_small, tmp_path, capsys):
    ckpt = str(tiny_checkpoint[0])
    rc = main(
        ["export", ckpt, str(tmp_path / "m.onnx"), "--precision", "int8", *calibration(synth_small, 1000)]
    )
    assert rc == CalibrationError.exit_code
    assert_one_line_error(rc, capsys.readouterr().err, "calibration asks for 1000 images")
    rc = main(
        ["export", ckpt, str(tmp_path / "m.onnx"), "--precision", "int8"]
    )  # the checkpoint names no data
    assert rc == ConfigError.exit_code
    assert_one_line_error(rc, capsys.readouterr().err, "--calibration-data IMAGES ANNOTATIONS")
    assert not (tmp_path / "m.onnx").exists()
