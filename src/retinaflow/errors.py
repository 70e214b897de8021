"""Library exceptions. The CLI turns each into a one-line message and a non-zero exit code."""

from __future__ import annotations


class RetinaflowError(Exception):
    """Base class: a user-facing problem with a clear one-line message."""

    exit_code = 1


class ConfigError(RetinaflowError):
    """Invalid configuration value, key or file."""

    exit_code = 2


class DataError(RetinaflowError):
    """Missing, unreadable or empty dataset; malformed annotations."""

    exit_code = 3


class CheckpointError(RetinaflowError):
    """Missing/corrupt checkpoint, or one of another architecture or class count."""

    exit_code = 4


class TrainingDiverged(RetinaflowError):
    """Loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 5


class MissingDependency(RetinaflowError):
    """An optional dependency (DALI, TensorRT, CUDA toolkit, ...) is needed for this call."""

    exit_code = 6


class TrainingInterrupted(RetinaflowError):
    """SIGTERM/SIGINT arrived; a checkpoint was written at the current iteration."""

    exit_code = 143


def first_line(exc: BaseException) -> str:
    """An exception as one line for a message: its text's first line (at most 200 characters), or its
    type's name when it has no text."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
