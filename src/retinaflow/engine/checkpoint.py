"""Checkpoints: atomic, versioned, self-describing, exactly resumable.

A checkpoint is one ``torch.save`` file holding::

    format_version  int (FORMAT_VERSION)
    arch            dict describing the network (backbone, classes, FPN/head sizes, anchors)
    model           state dict (unwrapped from DDP)
    optimizer       optimizer state dict (absent in weights-only exports)
    scaler          GradScaler state dict or None
    iteration       completed iterations
    rng             {"python", "torch", "cuda"} generator states
    config          Config.to_dict() — the resolved configuration
    class_names     list[str]; category_ids list[int] (label index -> COCO category id)

It is written to a temporary file in the same folder, fsynced and renamed over the target, so a
killed process leaves either the old or the new checkpoint, never a torn one; the temporary file a
kill leaves behind is removed by :func:`remove_orphan_temps` when training on that path starts again.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from retinaflow.errors import CheckpointError, first_line

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Generator states of Python, torch CPU and (if initialised) CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus the format version) to ``path``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data["format_version"] = FORMAT_VERSION
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


_TMP_SUFFIX = ".tmp"


def remove_orphan_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`save_checkpoint` for ``path`` that a killed write left behind.

    Only names of the form ``.NAME.<random>.tmp`` next to ``path`` (no dot in the random part, so
    another file's temporaries, e.g. ``.NAME.mlflow.json.<random>.tmp``, are left alone). Call it once,
    before training on ``path`` writes (rank 0); says what it removed in one log line.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[^.]+{re.escape(_TMP_SUFFIX)}")
    orphans = sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    if orphans:
        log.warning(
            "removed %d unfinished checkpoint write(s) of %s left by an interrupted run: %s",
            len(orphans), target, ", ".join(p.name for p in orphans),
        )  # fmt: skip
    return orphans


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a retinaflow checkpoint; raises CheckpointError with a one-line reason."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {p}")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:  # torch's own text advises weights_only=False, which would run the file's code
            raise CheckpointError(
                f"{p} is not a retinaflow checkpoint: it holds a Python object ({found.group(1)}), not "
                "only tensors and plain values (a pickled model, or another program's file?)"
            ) from exc
        if "weights only load failed" in text.lower():
            raise CheckpointError(
                f"cannot read checkpoint {p}: not a PyTorch file, or a damaged one"
            ) from exc
        raise CheckpointError(f"cannot read checkpoint {p}: {first_line(exc)}") from exc
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{p} is not a retinaflow checkpoint (no model weights)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format {version!r}; this retinaflow reads format {FORMAT_VERSION}"
        )
    return data


def check_arch(saved: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError naming the first field where two architecture descriptions differ."""
    for key in sorted(set(saved) | set(expected)):
        if saved.get(key) != expected.get(key):
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={saved.get(key)!r}, "
                f"but this run asks for {key}={expected.get(key)!r}"
            )
