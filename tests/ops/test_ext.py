"""Loading the kernels (errors without a toolchain, the reference fallback) and the operators on the CPU."""

from __future__ import annotations

import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
from tests.ops.oracle import GRID_THRESH, random_heads
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import cpp_extension

from retinaflow.errors import MissingDependency
from retinaflow.ops import _ext, _library, _reference, build


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(_ext, "_state", {})


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def test_cpu_only_torch_is_a_missing_dependency(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(MissingDependency) as info:
        _ext.load()
    assert "CUDA build of PyTorch" in _one_line(info.value)


def test_missing_nvcc_is_a_missing_dependency_with_a_how_to(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(MissingDependency) as info:
        _ext.load()
    assert "CUDA_HOME" in _one_line(info.value) and "nvcc" in str(info.value)
    with pytest.raises(MissingDependency):  # remembered: no second attempt
        _ext.load()


def test_missing_sources_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("RETINAFLOW_KERNELS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDependency, match="RETINAFLOW_KERNELS_DIR"):
        _ext.load()


def test_compiler_failure_becomes_one_line_and_is_not_retried(monkeypatch):
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'retinaflow_kernels'\nnvcc fatal: something\n...")

    monkeypatch.setattr(_ext, "_check_toolchain", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(MissingDependency) as info:
        _ext.load()
    assert "Error building extension" in _one_line(info.value)
    with pytest.raises(MissingDependency):
        _ext.load()
    assert len(calls) == 1
    assert calls[0]["is_python_module"] is False
    sources = [s.rsplit("/", 2)[-1] for s in calls[0]["sources"]]
    assert sources == ["decode.cu", "nms.cu", "match.cu", "group_norm.cu", "colour.cu", "ops.cpp"]


def test_cuda_tensors_without_kernels_fall_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.version, "cuda", None)
    fallbacks = []
    monkeypatch.setattr(_library, "register_reference_for_cuda", lambda: fallbacks.append(1))
    cuda_tensor = SimpleNamespace(device=torch.device("cuda", 0))  # only the device is consulted
    with caplog.at_level(logging.WARNING, logger="retinaflow.ops._ext"):
        _ext.ensure_loaded_for(torch.empty(0))  # CPU tensors need nothing
        assert not fallbacks and not caplog.records
        _ext.ensure_loaded_for(cuda_tensor)
        _ext.ensure_loaded_for(cuda_tensor)
    assert fallbacks == [1]
    assert len([r for r in caplog.records if "unavailable" in r.message]) == 1


def test_cuda_tensors_load_the_kernels_once(monkeypatch):
    loads = []
    monkeypatch.setattr(_ext, "load", lambda: loads.append(1))
    monkeypatch.setattr(_library, "register_reference_for_cuda", lambda: pytest.fail("no fallback expected"))
    for _ in range(3):
        _ext.ensure_loaded_for(SimpleNamespace(device=torch.device("cuda", 0)))
    assert loads == [1]


def test_build_command_reports_missing_toolkit(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert build.main([]) == MissingDependency.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_checkout_ships_every_kernel_source():
    for name in _ext.SOURCES:
        assert (_ext.kernel_dir() / name).is_file(), name


def test_python_constants_equal_the_kernels():
    """The limits and the dw/dh clamp are defined in the kernels and in Python: they must agree."""
    header = (_ext.kernel_dir() / "decode.h").read_text()
    source = (_ext.kernel_dir() / "decode.cu").read_text()
    assert re.search(rf"#define RF_DECODE_MAX_LEVELS {_library.MAX_LEVELS}\b", header)
    assert re.search(rf"#define RF_DECODE_MAX_TOP_N {_library.MAX_TOP_N}\b", header)
    clip = re.search(r"constexpr float kClip = ([0-9.]+)f;", source)
    assert clip and math.isclose(float(clip.group(1)), _reference.BBOX_XFORM_CLIP, rel_tol=1e-7)
    norm = (_ext.kernel_dir() / "group_norm.cu").read_text()
    assert re.search(rf"constexpr int kMaxChannels = {_library.MAX_NORM_CHANNELS};", norm)


def _decode_args():
    cls, box, anchors = random_heads(2, [(4, 6), (2, 3)], 3, 4, seed=0, mean=-1.0)
    return (cls, box, anchors, torch.tensor([[30, 40], [32, 48]]), GRID_THRESH, 7, 0)


def _nms_args():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 40, 2, generator=g) * 30], -1)
    classes = torch.randint(-1, 3, (2, 40), generator=g)
    return (torch.rand(2, 40, generator=g), boxes, classes, 0.5, 9)


def test_operators_pass_opcheck_on_cpu():
    torch.library.opcheck(torch.ops.retinaflow.decode.default, _decode_args())
    torch.library.opcheck(torch.ops.retinaflow.nms.default, _nms_args())  # match: test_matching.py


def test_fake_implementations_give_fixed_shapes():
    with FakeTensorMode() as mode:
        cls, box, anchors, sizes, thresh, top_n, cap = _decode_args()
        fake = [[mode.from_tensor(t) for t in ts] for ts in (cls, box, anchors)]
        s, b, c = torch.ops.retinaflow.decode(*fake, mode.from_tensor(sizes), thresh, top_n, cap)
        assert s.shape == (2, 14) and b.shape == (2, 14, 4) and c.shape == (2, 14) and c.dtype == torch.int64
        scores, boxes, classes, iou, max_det = _nms_args()
        fake_nms = [mode.from_tensor(t) for t in (scores, boxes, classes)]
        outs = torch.ops.retinaflow.nms(*fake_nms, iou, max_det)
        assert [tuple(o.shape) for o in outs] == [(2, 9), (2, 9, 4), (2, 9), (2,)]
        assert [o.dtype for o in outs] == [torch.float32, torch.float32, torch.int64, torch.int64]


def test_schema_is_declared_once():
    _library.register_ops()  # idempotent
    schema = str(torch.ops.retinaflow.decode.default._schema)
    assert schema.startswith("retinaflow::decode(Tensor[] cls, Tensor[] box, Tensor[] anchors, Tensor sizes")
