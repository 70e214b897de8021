"""retinaflow: a RetinaNet/FPN single-shot detector, trained and shipped on NVIDIA GPUs."""

from __future__ import annotations

__version__ = "0.1.0"
