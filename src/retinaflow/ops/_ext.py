"""Build and load the CUDA kernels as the CUDA implementation of the ``retinaflow::`` operators.

One build path: ``torch.utils.cpp_extension.load`` compiles ``kernels/decode.cu``, ``kernels/nms.cu``,
``kernels/match.cu``, ``kernels/group_norm.cu``, ``kernels/colour.cu`` and the thin binding
``kernels/torch/ops.cpp`` on first use and caches the library under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); later processes only load it.
``python -m retinaflow.ops.build`` runs the same build ahead of time (container images: set
``TORCH_CUDA_ARCH_LIST``, e.g. ``9.0``, when the build machine has no GPU).

Nothing is built by ``import retinaflow``: the public ops call :func:`ensure_loaded_for` on their first
CUDA tensor; :func:`load` raises :class:`~retinaflow.errors.MissingDependency` with a how-to.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from retinaflow.errors import MissingDependency
from retinaflow.ops import _library

log = logging.getLogger(__name__)

EXTENSION_NAME = "retinaflow_kernels"
SOURCES = ("decode.cu", "nms.cu", "match.cu", "group_norm.cu", "colour.cu", "torch/ops.cpp")

_lock = threading.Lock()
_state: dict[str, object] = {}


def kernel_dir() -> Path:
    """The folder holding the CUDA sources: ``RETINAFLOW_KERNELS_DIR`` or the checkout's ``kernels/``."""
    env = os.environ.get("RETINAFLOW_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "kernels"


def _check_toolchain() -> None:
    if torch.version.cuda is None:
        raise MissingDependency(
            f"the CUDA kernels need a CUDA build of PyTorch (this is {torch.__version__})"
        )
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        raise MissingDependency(
            f"the CUDA kernels compile once with nvcc, which was not found: install the CUDA "
            f"{torch.version.cuda} toolkit and set CUDA_HOME"
        )
    src = kernel_dir()
    missing = [s for s in SOURCES if not (src / s).is_file()]
    if missing:
        raise MissingDependency(
            f"CUDA kernel sources not found in {src} (missing {missing[0]}): set RETINAFLOW_KERNELS_DIR "
            "to the repository's kernels/ folder"
        )


def load(verbose: bool = False) -> str:
    """Compile (first time) and load the kernels; returns the library path. Thread-safe, once per process.

    Raises MissingDependency with a one-line how-to when no CUDA toolkit is available or the build fails.
    """
    with _lock:
        if "path" in _state:
            return str(_state["path"])
        if "error" in _state:
            raise MissingDependency(str(_state["error"]))
        try:
            _check_toolchain()
            from torch.utils import cpp_extension

            src = kernel_dir()
            log.info("loading retinaflow CUDA kernels (compiled once, cached under TORCH_EXTENSIONS_DIR)")
            path = cpp_extension.load(
                name=EXTENSION_NAME,
                sources=[str(src / s) for s in SOURCES],
                extra_include_paths=[str(src)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                is_python_module=False,
                verbose=verbose,
            )
        except MissingDependency as exc:
            _state["error"] = str(exc)
            raise
        except Exception as exc:  # compiler or loader failure: one line, the log has the rest
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            _state["error"] = (
                f"building the CUDA kernels failed ({first}); see python -m retinaflow.ops.build --verbose"
            )
            raise MissingDependency(str(_state["error"])) from exc
        _state["path"] = str(path)
        return str(path)


def kernels_loaded() -> bool:
    """Whether the compiled kernels serve the CUDA implementation in this process (not the reference)."""
    return "path" in _state


def ensure_loaded_for(t: torch.Tensor) -> None:
    """Give the operators a CUDA implementation before their first call on a CUDA tensor ``t``.

    The one load guard of the public ops: loads the kernels (building them the first time); where they
    cannot be built, logs one warning and registers the PyTorch reference as the CUDA implementation, so
    CUDA tensors still get (slower) results. CPU tensors need nothing.
    """
    if t.device.type != "cuda" or "resolved" in _state:
        return
    try:
        load()
    except MissingDependency as exc:
        log.warning("retinaflow CUDA kernels unavailable, using the PyTorch reference: %s", exc)
        _library.register_reference_for_cuda()
    _state["resolved"] = True
