"""The TensorRT plugins' plain-C++ core (kernels/tensorrt/plugin_core), compiled with g++ and run on the CPU.

The C API is replaced by a recording stub (c_api_stub.cpp) and CUDA's header by a minimal stand-in, so this
needs only a C++ compiler: it checks fields and their round trip, the output-shape and type rules, input
checks, and that the workspace query and launch receive the parameters the core derives.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
SOURCES = [ROOT / "kernels/tensorrt/plugin_core.cpp", HERE / "c_api_stub.cpp", HERE / "plugin_core_test.cpp"]
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++17 compiler (g++ or c++) on PATH")


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("plugin_core") / "plugin_core_test"
    includes = [f"-I{HERE / 'stub_include'}", f"-I{ROOT / 'kernels'}", f"-I{HERE}"]
    cmd = [str(CXX), "-std=c++17", "-O0", "-Wall", "-Wextra", "-Werror", *includes, *map(str, SOURCES), "-o"]
    subprocess.run([*cmd, str(exe)], check=True, capture_output=True, text=True, timeout=120)
    return exe


def test_plugin_core_unit_checks(program):
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("0 failed")


def contract(program: Path) -> dict:
    run = subprocess.run([str(program), "--contract"], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(run.stdout)


def test_onnx_nodes_carry_exactly_the_plugin_fields(program):
    """The plugin-flavour ONNX (Python) and the plugins (C++) agree on names, fields, inputs and outputs."""
    from retinaflow.export import plugin_onnx as po

    c = contract(program)
    assert (c["namespace"], c["version"]) == (po.PLUGIN_NAMESPACE, po.PLUGIN_VERSION)
    assert c["max_levels"] == po.MAX_LEVELS
    for op, spec in ((po.DECODE_OP, po.DECODE), (po.NMS_OP, po.NMS)):
        assert [tuple(f) for f in c[op]["fields"]] == list(spec.fields)
        assert c[op]["outputs"] == list(spec.outputs)
    assert c[po.DECODE_OP]["inputs_5_levels"] == po.decode_input_names(5)
    assert c[po.NMS_OP]["inputs"] == list(po.NMS.inputs)
