"""export_onnx / build_engine steps: export size, and an engine build that is skipped honestly."""

from __future__ import annotations

import json

import pytest

from retinaflow.config import Config
from retinaflow.errors import ConfigError
from retinaflow.kubeflow.steps.packaging import build_trt_engine, engine_file, export_size


@pytest.mark.parametrize(
    ("max_size", "resize", "side"), [(384, 256, 384), (1333, 800, 1344), (100, 128, 128)]
)
def test_export_size_covers_padded_inference_batches(monkeypatch, max_size, resize, side):
    cfg = Config()
    cfg.infer.max_size, cfg.infer.resize = max_size, resize
    monkeypatch.setattr(
        "retinaflow.engine.checkpoint.load_checkpoint", lambda path: {"config": cfg.to_dict()}
    )
    assert export_size("model.pth", 0) == side
    assert export_size("model.pth", 256) == 256
    with pytest.raises(ConfigError, match="multiple of 32"):
        export_size("model.pth", 100)


def test_disabled_build_records_why(tmp_path):
    result = build_trt_engine(tmp_path / "model.pth", tmp_path / "engine", enabled=False, precision="fp16")
    assert not result.built and "build_trt_engine=false" in result.reason
    assert json.loads((tmp_path / "engine" / "build.json").read_text()) == {
        "built": False,
        "reason": result.reason,
    }
    assert engine_file(tmp_path / "engine") is None


def test_build_without_tensorrt_is_skipped_not_faked(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the tensorrt-marked tests cover real builds")
    except ImportError:
        pass
    result = build_trt_engine(tmp_path / "model.pth", tmp_path / "engine", enabled=True, precision="fp16")
    assert not result.built and result.reason
    assert [p.name for p in (tmp_path / "engine").iterdir()] == ["build.json"]
