"""Catalogue: the files ``retinaflow infer|eval|export|train`` refuse as a checkpoint, each with our own
one-line message (never torch's advice to load with ``weights_only=False``, which would run code)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from retinaflow.engine.checkpoint import FORMAT_VERSION, load_checkpoint
from retinaflow.errors import CheckpointError


def _garbage(path: Path) -> None:
    path.write_bytes(b"garbage")


def _pickled_object(path: Path) -> None:
    torch.save(argparse.Namespace(model={"w": torch.zeros(1)}), path)  # e.g. torch.save(model)


def _plain_state_dict(path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, path)


def _other_format(path: Path) -> None:
    torch.save({"model": {}, "format_version": FORMAT_VERSION + 100}, path)


REFUSED = {
    "not a torch file": (_garbage, "cannot read checkpoint"),
    "a pickled Python object": (_pickled_object, r"holds a Python object \(argparse.Namespace\)"),
    "a bare state dict": (_plain_state_dict, "is not a retinaflow checkpoint"),
    "another checkpoint format": (_other_format, "checkpoint format"),
}


@pytest.mark.parametrize(("write", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_checkpoints(tmp_path: Path, write, message: str) -> None:
    path = tmp_path / "m.pth"
    write(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_orphan_temp_files_of_a_killed_write_are_removed_when_training_starts_again(
    synth_small, tmp_path: Path, caplog
) -> None:
    from tests.conftest import tiny_config

    from retinaflow.engine.train import train

    path = train(tiny_config(synth_small, iters=1), tmp_path / "m.pth")
    orphans = [tmp_path / ".m.pth.k1ll3d_a.tmp", tmp_path / ".m.pth.zz9x0y1w.tmp"]
    others = [tmp_path / ".other.pth.abcd1234.tmp", tmp_path / ".m.pth.mlflow.json.abcd1234.tmp"]
    for f in orphans + others:
        f.write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="retinaflow.engine.checkpoint"):
        train(tiny_config(synth_small, iters=1), path)  # already done: starts, cleans, stops
    assert not any(f.exists() for f in orphans)
    assert all(f.exists() for f in others) and load_checkpoint(path)["iteration"] == 1
    lines = [r.getMessage() for r in caplog.records if "unfinished checkpoint" in r.getMessage()]
    assert len(lines) == 1 and all(f.name in lines[0] for f in orphans), lines
