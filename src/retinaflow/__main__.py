"""``python -m retinaflow`` (and ``torchrun -m retinaflow``) runs the CLI."""

from __future__ import annotations

import sys

from retinaflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
