"""TensorRT engines with the retinaflow plugins: clear errors here; build + parity in the export image.

The ``tensorrt``-marked tests need TensorRT, its headers (for the plugin library) and a GPU: they run in
dockerfiles/export.Dockerfile. The others check, on any machine, the errors a user meets first.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import onnx
import pytest
import torch
from onnx import helper

from retinaflow.cli import main
from retinaflow.config import ExportConfig, InferConfig
from retinaflow.errors import ConfigError, MissingDependency
from retinaflow.export import trt_plugins
from retinaflow.export.engines import EngineError, is_engine, open_engine
from retinaflow.export.plugin_onnx import MissingPluginNodes, export_plugin_onnx
from retinaflow.export.tensorrt import PlanMismatch, build_engine, check_plan, require_tensorrt

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(
        not HAVE_TRT or not torch.cuda.is_available(), reason="needs TensorRT and a GPU (export image)"
    ),
]
INFER = InferConfig(score_thresh=0.02, top_n=100, nms_iou=0.5, max_det=50)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_error_says_how_to_get_it():
    with pytest.raises(MissingDependency, match=r"export\.Dockerfile"):
        require_tensorrt()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_infer_on_a_plan_without_tensorrt_is_one_line_saying_how_to_get_it(tmp_path, capsys):
    (tmp_path / "m.plan").write_bytes(b"plan")
    (tmp_path / "images").mkdir()
    assert is_engine(tmp_path / "m.plan")
    images, output = str(tmp_path / "images"), str(tmp_path / "o.json")
    code = main(["infer", str(tmp_path / "m.plan"), "--images", images, "--output", output])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retinaflow:")]
    assert code != 0 and len(err) == 1
    assert "TensorRT is not installed" in err[0] and "export.Dockerfile" in err[0]


def test_a_plan_without_its_metadata_or_off_the_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # past the import check
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(EngineError, match=r"m\.plan\.json \(the plan's metadata\) is missing"):
        open_engine(plan)
    sidecar = tmp_path / "m.plan.json"
    sidecar.write_text(json.dumps({"tensorrt": "10.13.0", "height": 128, "width": 128}))
    with pytest.raises(EngineError, match=r"re-export it with retinaflow export model\.pth m\.plan"):
        open_engine(plan)
    sidecar.write_text(json.dumps({"tensorrt": "10.13.0", "class_names": ["a"], "category_ids": [1]}))
    with pytest.raises(EngineError, match="runs on a CUDA device, not cpu"):
        open_engine(plan, "cpu")


def test_plugin_library_without_tensorrt_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORRT_HOME", str(tmp_path))
    with pytest.raises(MissingDependency, match=r"NvInfer\.h.*export\.Dockerfile"):
        trt_plugins.tensorrt_dirs()


def test_onnx_without_plugin_nodes_is_refused_before_tensorrt(tmp_path):
    x = helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["batch", 3, 128, 128])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3, 128, 128])
    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "net.onnx"))
    with pytest.raises(MissingPluginNodes, match="export_plugin_onnx"):
        build_engine(tmp_path / "net.onnx", tmp_path / "m.plan", ExportConfig(precision="fp32"))
    with pytest.raises(ConfigError, match="precision"):
        build_engine(tmp_path / "net.onnx", tmp_path / "m.plan", ExportConfig(precision="int4"))


def test_plan_from_another_tensorrt_or_gpu_is_refused():
    here = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0", "plugin_version": "1"}
    check_plan(dict(here), here, "m.plan")
    with pytest.raises(PlanMismatch, match=r"TensorRT 10\.9\.0 .* this is 10\.13\.0"):
        check_plan({**here, "tensorrt": "10.9.0"}, here, "m.plan")
    with pytest.raises(PlanMismatch, match=r"compute capability 8\.0"):
        check_plan({**here, "compute_capability": "8.0", "gpu": "A100"}, here, "m.plan")


@pytest.fixture(scope="module")
def plugin_model(tiny_checkpoint, tmp_path_factory):
    ckpt, _ = tiny_checkpoint
    folder = tmp_path_factory.mktemp("trt")
    return ckpt, export_plugin_onnx(ckpt, folder / "m.onnx", ExportConfig(height=256, width=256), INFER)


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not HAVE_TRT or not torch.cuda.is_available(), reason="needs TensorRT and a GPU (export image)"
)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_the_pytorch_path(plugin_model, tmp_path, precision):
    from retinaflow.engine.infer import detect, load_model
    from retinaflow.export.tensorrt import TensorRTDetector

    ckpt, onnx_path = plugin_model
    cfg = ExportConfig(
        precision=precision, min_batch=1, opt_batch=2, max_batch=4, timing_cache=str(tmp_path / "tc")
    )
    plan = build_engine(onnx_path, tmp_path / "m.plan", cfg)
    assert (tmp_path / "tc").stat().st_size > 0
    detector = TensorRTDetector(plan)
    images = (torch.rand(6, 3, 224, 256) * 255).cuda()  # 6 > max_batch: runs in chunks; 224 < 256: padded
    sizes = torch.tensor([[224, 256], [200, 180]] * 3).cuda()
    got = detector(images, sizes)
    net, config, _ = load_model(ckpt, torch.device("cuda"))
    config.infer = INFER
    ref = detect(net, torch.nn.functional.pad(images, (0, 0, 0, 32)), sizes, config)
    assert got.classes.dtype == torch.int64 and got.scores.shape == (6, INFER.max_det)
    same = got.classes == ref.classes
    assert same.float().mean() > (0.95 if precision == "fp32" else 0.8)
    atol = 1e-3 if precision == "fp32" else 2e-2
    torch.testing.assert_close(got.scores[same], ref.scores[same], rtol=0, atol=atol)
    (tmp_path / "m.plan.json").write_text(
        (tmp_path / "m.plan.json").read_text().replace('"tensorrt": "', '"tensorrt": "0.')
    )
    with pytest.raises(PlanMismatch):
        TensorRTDetector(plan)


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not HAVE_TRT or not torch.cuda.is_available(), reason="needs TensorRT and a GPU (export image)"
)
def test_retinaflow_infer_on_a_plan_finds_what_the_checkpoint_finds(tiny_checkpoint, synth_small, tmp_path):
    from retinaflow.engine.infer import infer
    from retinaflow.export.engine_infer import infer_engine
    from retinaflow.export.tensorrt import export_plan

    ckpt, _ = tiny_checkpoint
    plan = export_plan(ckpt, tmp_path / "m.plan", ExportConfig(precision="fp32", min_batch=1, max_batch=4))
    meta = json.loads((tmp_path / "m.plan.json").read_text())
    assert meta["class_names"] == ["a", "b", "c"] and meta["format"] == "tensorrt"
    images, ann = synth_small.val_images, synth_small.val_annotations
    infer(ckpt, images, tmp_path / "torch.json", annotations=ann, device="cuda")
    assert infer_engine(plan, images, tmp_path / "plan.json", ann, overrides={"batch": 4}) is not None
    expected = json.loads((tmp_path / "torch.json").read_text())
    got = json.loads((tmp_path / "plan.json").read_text())
    assert {d["image_id"] for d in got} == {d["image_id"] for d in expected}
    assert abs(len(got) - len(expected)) <= 0.05 * len(expected)
