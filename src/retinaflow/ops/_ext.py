"""Build and load the CUDA kernels as the CUDA implementation of the ``retinaflow::`` operators.

One build path: ``torch.utils.cpp_extension.load`` compiles ``kernels/decode.cu``, ``kernels/nms.cu``,
``kernels/match.cu`` and the thin binding ``kernels/torch/ops.cpp`` on first use and caches the library under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes only load it.
``python -m retinaflow.ops.build`` runs the same build ahead of time (container images: set
``TORCH_CUDA_ARCH_LIST``, e.g. ``9.0``, when the build machine has no GPU).

Nothing here is imported eagerly by ``import retinaflow``; a machine without the CUDA toolkit gets
:class:`~retinaflow.errors.MissingDependency` only when it asks for the kernels explicitly.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from retinaflow.errors import MissingDependency
from retinaflow.ops import _library
from retinaflow.ops.detections import Detections

log = logging.getLogger(__name__)

EXTENSION_NAME = "retinaflow_kernels"
SOURCES = ("decode.cu", "nms.cu", "match.cu", "torch/ops.cpp")
# Candidates kept per (image, level) by the decode kernels' fast path; more fall back to an exact
# slower path (see kernels/decode.h).
DEFAULT_CAPACITY = 32768

_lock = threading.Lock()
_state: dict[str, object] = {}


def kernel_dir() -> Path:
    """The folder holding the CUDA sources: ``RETINAFLOW_KERNELS_DIR`` or the checkout's ``kernels/``."""
    env = os.environ.get("RETINAFLOW_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "kernels"


def _check_toolchain() -> None:
    if torch.version.cuda is None:
        raise MissingDependency(
            f"the CUDA kernels need a CUDA build of PyTorch (this is {torch.__version__}); "
            "use CPU tensors or RETINAFLOW_OPS_BACKEND=reference"
        )
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        raise MissingDependency(
            f"the CUDA kernels compile once with nvcc, which was not found: install the CUDA "
            f"{torch.version.cuda} toolkit and set CUDA_HOME (or use RETINAFLOW_OPS_BACKEND=reference)"
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
            _library.register()
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


def available() -> bool:
    """True if the kernels are loaded or can be built now (tries once; logs a warning on failure)."""
    if "path" in _state:
        return True
    if "error" in _state:
        return False
    try:
        load()
    except MissingDependency as exc:
        log.warning("retinaflow CUDA kernels unavailable, using the PyTorch reference: %s", exc)
        return False
    return True


def decode(
    cls: list[torch.Tensor],
    box: list[torch.Tensor],
    anchors: list[torch.Tensor],
    sizes: torch.Tensor,
    score_thresh: float,
    top_n: int,
    capacity: int = DEFAULT_CAPACITY,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``retinaflow::decode`` (see :func:`retinaflow.ops.boxes.decode`); loads the kernels first."""
    if "path" not in _state:
        load()
    op = torch.ops.retinaflow.decode
    return op(cls, box, anchors, sizes, float(score_thresh), int(top_n), int(capacity))


def nms(
    scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, iou_threshold: float, max_det: int
) -> Detections:
    """``retinaflow::nms`` (see :func:`retinaflow.ops.boxes.nms`); loads the kernels first."""
    if "path" not in _state:
        load()
    return Detections(*torch.ops.retinaflow.nms(scores, boxes, classes, float(iou_threshold), int(max_det)))


def match(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
) -> torch.Tensor:
    """``retinaflow::match`` (see :func:`retinaflow.ops.matching.match`); loads the kernels first."""
    if "path" not in _state:
        load()
    op = torch.ops.retinaflow.match
    return op(anchors, gt_boxes, gt_labels, float(fg_iou), float(bg_iou), bool(allow_low_quality))
