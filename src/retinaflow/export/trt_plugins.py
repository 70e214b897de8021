"""Build and load the TensorRT plugin library (``kernels/tensorrt``: retinaflow::Decode and retinaflow::NMS).

    python -m retinaflow.export.trt_plugins [--verbose]     # build ahead of time, print the library path

Same mechanism as the PyTorch ops (:mod:`retinaflow.ops._ext`): ``torch.utils.cpp_extension.load`` compiles
the kernels (``decode.cu``, ``nms.cu``) with the plugin core and the IPluginV3 adapter once, caches the
library under ``TORCH_EXTENSIONS_DIR`` and loads it, which registers the plugin creators with TensorRT.
TensorRT's headers and ``libnvinfer`` are found under ``TENSORRT_HOME`` (``include/``, ``lib/``) or the
system paths of the NGC TensorRT image (dockerfiles/export.Dockerfile). Without them: MissingDependency.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from retinaflow.errors import MissingDependency

LIBRARY_NAME = "retinaflow_trt_plugins"
SOURCES = ("decode.cu", "nms.cu", "tensorrt/plugin_core.cpp", "tensorrt/plugins.cpp")
HOW_TO = "build and run .plan engines in the export image: docker build -f dockerfiles/export.Dockerfile ."
_INCLUDE_DIRS = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")

_lock = threading.Lock()
_loaded: dict[str, str] = {}


def tensorrt_dirs() -> tuple[Path, Path]:
    """(include dir holding NvInfer.h, lib dir holding libnvinfer.so); MissingDependency if absent."""
    home = os.environ.get("TENSORRT_HOME")
    includes = [Path(home) / "include"] if home else [Path(p) for p in _INCLUDE_DIRS]
    libs = [Path(home) / "lib"] if home else [Path(p) for p in _LIB_DIRS]
    include = next((p for p in includes if (p / "NvInfer.h").is_file()), None)
    lib = next((p for p in libs if any(p.glob("libnvinfer.so*"))), None)
    if include is None or lib is None:
        where = f"TENSORRT_HOME={home}" if home else "the system paths"
        raise MissingDependency(
            f"the TensorRT plugin library needs TensorRT's headers (NvInfer.h) and libnvinfer, not found in "
            f"{where}: {HOW_TO} (or set TENSORRT_HOME)"
        )
    return include, lib


def load(verbose: bool = False) -> str:
    """Compile (first time) and load the plugin library; returns its path. Once per process."""
    with _lock:
        if "path" in _loaded:
            return _loaded["path"]
        from retinaflow.ops._ext import _check_toolchain, kernel_dir

        _check_toolchain()
        include, lib = tensorrt_dirs()
        from torch.utils import cpp_extension

        src = kernel_dir()
        try:
            path = cpp_extension.load(
                name=LIBRARY_NAME,
                sources=[str(src / s) for s in SOURCES],
                extra_include_paths=[str(src), str(src / "tensorrt"), str(include)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                extra_ldflags=[f"-L{lib}", "-lnvinfer"],
                is_python_module=False,  # loading it runs the creators' registration
                verbose=verbose,
            )
        except Exception as exc:  # compiler or loader failure: one line, --verbose has the rest
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise MissingDependency(
                f"building the TensorRT plugins failed ({first}); "
                "see python -m retinaflow.export.trt_plugins --verbose"
            ) from exc
        _loaded["path"] = str(path)
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retinaflow.export.trt_plugins", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)
    try:
        print(load(verbose=args.verbose))
    except MissingDependency as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
