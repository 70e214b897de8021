"""How ``.pt2`` packages are loaded (:mod:`retinaflow.export.engines`), apart from running them."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh process: is a libtorch symbol visible in the global scope (where a dlopen'ed package's
# wrapper.so resolves its C++ standard library templates) before and after the loader's preparation?
GLOBAL_SCOPE = """
import ctypes, torch
name = "aoti_torch_empty_strided"
before = hasattr(ctypes.CDLL(None), name)
from retinaflow.export.engines import _torch_libraries_global
_torch_libraries_global()
print(before, hasattr(ctypes.CDLL(None), name))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RTLD_GLOBAL promotion is Linux-only")
def test_libtorch_is_made_global_before_a_package_loads():
    """Python loads libtorch RTLD_LOCAL; a CUDA package's wrapper.so then used its own copies of the
    std::regex templates and crashed in every fresh process on the GPU machines (SIGSEGV in
    ``regex_traits::transform_primary``), while a C++ program, with libtorch global, loaded it."""
    out = subprocess.run([sys.executable, "-c", GLOBAL_SCOPE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
