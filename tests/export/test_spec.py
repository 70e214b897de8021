"""Export requests: format from the extension, sizes and batch ranges from the checkpoint, clear errors."""

from __future__ import annotations

import pytest

from retinaflow.cli import main
from retinaflow.config import Config, ExportConfig
from retinaflow.errors import ConfigError, MissingDependency
from retinaflow.export.spec import default_size, engine_format, resolve


def test_format_follows_the_extension():
    assert engine_format("a/model.onnx") == "onnx"
    assert engine_format("model.PT2") == "pt2"
    assert engine_format("model.plan") == "tensorrt"
    with pytest.raises(ConfigError, match=r"\.onnx, \.pt2, \.plan"):
        engine_format("model.bin")


def test_default_size_is_valid_for_the_default_config():
    # regression: the old default 800x1344 failed its own multiple-of-128 check
    cfg = Config()
    assert default_size(cfg) == (1344, 1344)  # 1333 padded to 32, both orientations
    spec = resolve("m.onnx", ExportConfig(), cfg)
    assert (spec.height, spec.width, spec.min_batch, spec.max_batch, spec.precision) == (
        1344,
        1344,
        1,
        32,
        "fp32",
    )


def test_sizes_batches_and_precisions_are_checked():
    cfg = Config()
    assert resolve("m.pt2", ExportConfig(height=800, width=1344), cfg).width == 1344
    with pytest.raises(ConfigError, match="multiples of 32"):
        resolve("m.pt2", ExportConfig(height=800, width=1333), cfg)
    with pytest.raises(ConfigError, match="empty"):
        resolve("m.pt2", ExportConfig(min_batch=8, max_batch=4), cfg)
    with pytest.raises(ConfigError, match="precision"):
        resolve("m.pt2", ExportConfig(precision="int8"), cfg)
    assert not resolve("m.pt2", ExportConfig(min_batch=4, max_batch=4), cfg).dynamic_batch


def test_cli_plan_and_unknown_extension_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    assert main(["export", str(path), str(tmp_path / "m.plan")]) == MissingDependency.exit_code
    assert main(["export", str(path), str(tmp_path / "m.bin")]) == ConfigError.exit_code
    assert main(["export", str(path), str(tmp_path / "m.onnx"), "--batch", "1", "2", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "TensorRT is not installed" in err[0] and "--batch takes" in err[2]
