"""Do two sets of fixed-size detections agree? (engine vs the PyTorch reference path)

Tolerances of issue 15: the same number of detections and the same classes, row by row; scores within
``SCORE_ATOL`` and boxes within ``BOX_RTOL`` relative to the box's coordinate (with ``BOX_ATOL`` pixels
of slack near 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retinaflow.errors import RetinaflowError

SCORE_ATOL = 1e-4
BOX_RTOL, BOX_ATOL = 1e-3, 1e-2


class ExportMismatch(RetinaflowError):
    """An engine's outputs differ from PyTorch's beyond the stated tolerance."""


@dataclass
class ParityReport:
    """Largest absolute and relative differences between an engine's outputs and PyTorch's."""

    max_abs: float
    max_rel: float
    batch_sizes: tuple[int, ...]


def compare_detections(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], what: str) -> float:
    """Compare ``(num_detections, boxes, scores, classes)`` tuples (B,), (B, D, 4), (B, D), (B, D).

    Returns the largest box difference relative to the coordinate; raises ExportMismatch naming the
    first image that differs.
    """
    n_e, b_e, s_e, c_e = (np.asarray(x) for x in expected)
    n_g, b_g, s_g, c_g = (np.asarray(x) for x in got)
    worst = 0.0
    for i in range(len(n_e)):
        n = int(n_e[i])
        if int(n_g[i]) != n:
            raise ExportMismatch(f"{what}: image {i} has {int(n_g[i])} detections, PyTorch has {n}")
        if not np.array_equal(c_g[i, :n], c_e[i, :n]):
            raise ExportMismatch(f"{what}: image {i} has other classes than PyTorch")
        ds = np.abs(s_g[i, :n] - s_e[i, :n])
        if ds.size and ds.max() > SCORE_ATOL:
            raise ExportMismatch(f"{what}: image {i} scores differ by up to {ds.max():.3g} (> {SCORE_ATOL})")
        db = np.abs(b_g[i, :n] - b_e[i, :n])
        if db.size and not np.all(db <= BOX_ATOL + BOX_RTOL * np.abs(b_e[i, :n])):
            raise ExportMismatch(f"{what}: image {i} boxes differ by up to {db.max():.3g} px")
        if db.size:
            worst = max(worst, float((db / (np.abs(b_e[i, :n]) + 1.0)).max()))
    return worst
