from __future__ import annotations

import random

import pytest
import torch

from retinaflow.engine.checkpoint import (
    FORMAT_VERSION,
    check_arch,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retinaflow.errors import CheckpointError


def test_save_load_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "sub" / "m.pth"
    w = torch.randn(3, 4)
    save_checkpoint(path, {"model": {"w": w}, "iteration": 7, "arch": {"backbone": "resnet18"}})
    data = load_checkpoint(path)
    assert torch.equal(data["model"]["w"], w)
    assert data["iteration"] == 7 and data["format_version"] == FORMAT_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["m.pth"]


def test_overwrite_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "iteration": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.ones(1)}, "iteration": 2})
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        load_checkpoint(garbage)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.pth"
    save_checkpoint(truncated, {"model": {"w": torch.randn(1000)}})
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a retinaflow checkpoint"):
        load_checkpoint(other)
    old = tmp_path / "old.pth"
    torch.save({"model": {}, "format_version": 0}, old)
    with pytest.raises(CheckpointError, match="format 0"):
        load_checkpoint(old)


def test_check_arch_names_the_difference():
    check_arch(
        {"backbone": "resnet50", "num_classes": 3}, {"backbone": "resnet50", "num_classes": 3}, "m.pth"
    )
    with pytest.raises(CheckpointError, match=r"num_classes=3.*num_classes=5"):
        check_arch(
            {"backbone": "resnet50", "num_classes": 3}, {"backbone": "resnet50", "num_classes": 5}, "m.pth"
        )


def test_rng_state_round_trip_through_a_file(tmp_path):
    state = rng_state()
    save_checkpoint(tmp_path / "r.pth", {"model": {}, "rng": state})
    expected = (random.random(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    got = (random.random(), torch.rand(3))
    assert expected[0] == got[0] and torch.equal(expected[1], got[1])
