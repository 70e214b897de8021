"""Ahead-of-time build of the CUDA post-processing kernels (for container images and CI caches).

    python -m retinaflow.ops.build [--verbose]

Runs the same ``torch.utils.cpp_extension.load`` as first use does and prints the library path. The
result lands in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes with
the same settings only load it. On a machine without a GPU set ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``
for H100/H200, ``"8.0;8.6;8.9;9.0"`` for a wider image).
"""

from __future__ import annotations

import argparse
import sys

from retinaflow.errors import MissingDependency
from retinaflow.ops import _ext


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retinaflow.ops.build", description="Build the kernels.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)
    try:
        path = _ext.load(verbose=args.verbose)
    except MissingDependency as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
