"""fp16 ONNX (runs in ONNX Runtime's CPU kernels) and the export errors of fp16/int8, on any machine.

int8 itself (ModelOpt calibration) is tests/export/test_int8_export.py.
"""

from __future__ import annotations

import sys

import onnx
import pytest
from onnx import TensorProto
from tests.export.lowered import compare_onnx, sharpen
from tests.test_cli import assert_one_line_error

from retinaflow.cli import main
from retinaflow.errors import ConfigError, MissingDependency
from retinaflow.export.onnx import read_metadata


def test_fp16_onnx_runs_in_onnx_runtime_close_to_fp32(tiny_checkpoint, synth_small, tmp_path):
    ckpt = sharpen(tiny_checkpoint[0], tmp_path / "sharp.pth")
    fp32, fp16 = tmp_path / "fp32.onnx", tmp_path / "fp16.onnx"
    assert main(["export", str(ckpt), str(fp32), "--batch", "1", "8"]) == 0
    assert main(["export", str(ckpt), str(fp16), "--batch", "1", "8", "--precision", "fp16"]) == 0
    graph = onnx.load(str(fp16)).graph
    weights = [i for i in graph.initializer if len(i.dims) == 4]
    assert weights and all(w.data_type == TensorProto.FLOAT16 for w in weights)
    assert [i.type.tensor_type.elem_type for i in graph.input] == [TensorProto.UINT8, TensorProto.INT64]
    assert read_metadata(fp16)["precision"] == "fp16"
    # Measured with the fixture's GroupNorm head: 289 of the 296 detections scoring >= 0.4 found (the rest
    # near the cut), scores within 1.7e-3, IoU >= 0.9926 (without head norm: all 158, 8.1e-4, 0.9988).
    total, hits, score_diff, iou = compare_onnx(
        fp32, fp16, synth_small.val_images, synth_small.val_annotations
    )
    assert total >= 50 and hits >= 0.95 * total
    assert score_diff <= 3e-3 and iou >= 0.99


@pytest.mark.parametrize(
    ("output", "argv", "fragment", "code"),
    [
        ("m.pt2", ["--precision", "int8"], "precision int8 is not available for .pt2", 2),
        ("m.onnx", ["--precision", "bf16"], "export bf16 as .pt2", 2),
        ("m.plan", ["--precision", "bf16"], "precision bf16 is not available for .plan", 2),
        ("m.onnx", ["--precision", "int8", "--calibration-images", "0"], "calibration_images must be", 2),
    ],
)
def test_precisions_a_format_cannot_hold_are_one_line_errors(
    tiny_checkpoint, tmp_path, capsys, output, argv, fragment, code
):
    rc = main(["export", str(tiny_checkpoint[0]), str(tmp_path / output), *argv])
    assert rc == code
    assert_one_line_error(rc, capsys.readouterr().err, fragment)
    assert not (tmp_path / output).exists()


def test_int8_without_modelopt_says_how_to_get_it(
    tiny_checkpoint, synth_small, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)  # as if not installed
    data = [str(synth_small.train_images), str(synth_small.train_annotations)]
    argv = ["--precision", "int8", "--calibration-data", *data]
    rc = main(["export", str(tiny_checkpoint[0]), str(tmp_path / "m.onnx"), *argv])
    assert rc == MissingDependency.exit_code
    assert_one_line_error(rc, capsys.readouterr().err, "pip install 'retinaflow[quantize]'")


def test_the_int8_flags_are_export_config_keys():
    from retinaflow.cli import build_parser
    from retinaflow.commands.export import export_config

    args = build_parser().parse_args(
        ["export", "m.pth", "m.plan", "--precision", "int8", "--calibration-images", "64",
         "--calibration-data", "imgs", "ann.json", "--int8-keep-head", "--opset", "18"]
    )  # fmt: skip
    cfg = export_config(args)
    assert (cfg.precision, cfg.calibration_images, cfg.calibration_data) == ("int8", 64, ("imgs", "ann.json"))
    assert cfg.int8_keep_head and cfg.opset == 18
    with pytest.raises(ConfigError, match="calibration_data"):
        from retinaflow.config import Config

        Config.from_dict({"export": {"calibration_data": ["only-one"]}})
