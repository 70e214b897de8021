"""``retinaflow`` command line: each subcommand maps flags onto a config and calls one library function.

Errors raised by the library (retinaflow.errors) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from retinaflow import __version__
from retinaflow.commands import data, export, predict, train
from retinaflow.commands.optional import add_optional_commands
from retinaflow.errors import RetinaflowError, TrainingDiverged, TrainingInterrupted

log = logging.getLogger("retinaflow")

_COLLECTIVE = (TrainingInterrupted, TrainingDiverged)  # decided by all ranks together (engine.train)


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retinaflow",
        description="RetinaNet/FPN object detection: train, infer, evaluate, export; MLflow and Kubeflow.",
    )
    parser.add_argument("--version", action="version", version=f"retinaflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, predict, export, data):
        module.add_commands(sub)
    add_optional_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # compiling symbolic sizes, torch's value-range analysis logs a warning for each expression it
        # cannot bound ("failed while executing pow_by_natural([VR[3, int_oo], VR[-1, -1]])") and the
        # compile goes on (on an H200, 6 such lines in a --compile-package run): noise, hidden unless -v
        logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except RetinaflowError as exc:
        if args.verbose:
            raise
        if not (isinstance(exc, _COLLECTIVE) and os.environ.get("RANK", "0") != "0"):
            print(f"retinaflow: error: {exc}", file=sys.stderr)  # all ranks stop together: rank 0 says it
        return exc.exit_code
    except KeyboardInterrupt:
        print("retinaflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure we did not anticipate: still one line, with a pointer
        if args.verbose or os.environ.get("RETINAFLOW_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"retinaflow: error: {type(exc).__name__}: {first} (rerun with -v for the traceback)",
            file=sys.stderr,
        )
        return 1
