"""Faults under DDP on 2 processes, gloo (CPU) and NCCL (``gpu``, 2 GPUs): SIGTERM to one rank, a
non-finite loss on one rank, resuming a checkpoint on another number of ranks.

The runs are real ``torchrun ... -m retinaflow train`` commands; test_distributed.py's shim pauses a rank
at a known step (so the signal lands mid-run even on a fast GPU) and makes one rank's loss NaN.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import tiny_config
from tests.engine.test_distributed import BACKENDS, launch_env, logged_losses, run_train, train_cmd, writes

from retinaflow.engine.checkpoint import load_checkpoint


def _config(synth, tmp_path: Path, iters: int, checkpoint_every: int) -> Path:
    cfg = tiny_config(synth, iters=iters)
    cfg.train.batch = 4  # global: 2 images per rank
    cfg.train.checkpoint_every = checkpoint_every
    path = tmp_path / "cfg.yaml"
    cfg.dump(path)
    return path


def exit_codes(torchrun_output: str) -> dict[int, int]:
    """rank -> exit code, from the failure report torchrun prints when a worker fails."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", torchrun_output)
    return {int(rank): int(code) for rank, code in found}


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {seconds} s"
        time.sleep(0.05)


def workers_of(launcher: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (Linux /proc: its children, by the RANK they were given).

    /proc rather than psutil, which only the MLOps extras install."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or _parent(entry) != launcher:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        found.update({int(v[5:]): int(entry.name) for v in environ if v.startswith(b"RANK=")})
    return found


def _parent(proc: Path) -> int:
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference of two checkpoints' weights and optimizer momentum buffers."""
    pairs = [(a["model"][k], b["model"][k]) for k in a["model"]]
    for i, state in a["optimizer"]["state"].items():
        pairs += [(v, b["optimizer"]["state"][i][k]) for k, v in state.items() if torch.is_tensor(v)]
    assert a["model"].keys() == b["model"].keys()
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in pairs)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_to_one_rank_stops_all_and_the_same_command_resumes_exactly(
    synth_small, tmp_path, backend, record_property
):
    cfg = _config(synth_small, tmp_path, iters=6, checkpoint_every=10_000)  # only the signal saves
    out = tmp_path / "run"
    ckpt = out / "m.pth"
    command = train_cmd(str(ckpt), "--config", str(cfg))
    log = tmp_path / "interrupted.log"
    with log.open("w") as fh:  # rank 0 pauses after its 2nd step; meanwhile rank 1 gets SIGTERM
        proc = subprocess.Popen(command, env=launch_env(tmp_path, backend, pause="0:2"), stderr=fh, stdout=fh)
        try:
            wait_for(tmp_path / "paused", proc)
            workers = workers_of(proc.pid)
            assert sorted(workers) == [0, 1]
            os.kill(workers[1], signal.SIGTERM)
            (tmp_path / "go").touch()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = log.read_text()
    assert proc.returncode != 0, err[-3000:]
    assert not any(alive(pid) for pid in workers.values())  # every rank exited
    # both workers left through TrainingInterrupted (143), none was killed by torchrun
    assert exit_codes(err) == {0: 143, 1: 143}, err[-3000:]
    stopped = int(load_checkpoint(ckpt)["iteration"])
    assert stopped in (2, 3), err[-3000:]  # the signal is seen at the end of step 2 or 3
    said = [line for line in err.splitlines() if line.startswith("retinaflow:")]
    assert len(said) == 1, err[-3000:]  # said once, by rank 0
    assert said[0].startswith(f"retinaflow: error: interrupted at iteration {stopped};"), said
    assert writes(tmp_path) == [f"0 {ckpt}"]  # one checkpoint, written by rank 0
    assert sorted(p.name for p in out.iterdir()) == ["m.pth"]  # no temporary file left behind

    resumed = run_train(tmp_path, backend, str(ckpt), "--config", str(cfg))  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(logged_losses(resumed.stderr)) == list(range(stopped + 1, 7))  # continued, not restarted
    assert writes(tmp_path) == [f"0 {ckpt}"]

    reference = tmp_path / "reference" / "m.pth"
    proc2 = run_train(tmp_path, backend, str(reference), "--config", str(cfg))
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    a, b = load_checkpoint(ckpt), load_checkpoint(reference)
    assert a["iteration"] == b["iteration"] == 6
    difference = _max_difference(a, b)
    record_property("resume_max_abs_difference", difference)
    print(f"{backend}: interrupted at {stopped} + resumed vs uninterrupted: max |diff| {difference:.3g}")
    if backend == "gloo":
        assert difference == 0.0  # bitwise
    else:  # cuDNN picks its algorithms per process (benchmark mode, TF32): close, not necessarily bitwise
        assert difference < 1e-3, difference


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_loss_on_one_rank_stops_all_ranks(synth_small, tmp_path, backend):
    cfg = _config(synth_small, tmp_path, iters=6, checkpoint_every=2)
    ckpt = tmp_path / "run" / "m.pth"
    proc = subprocess.run(
        train_cmd(str(ckpt), "--config", str(cfg)),
        env=launch_env(tmp_path, backend, nan="1:3"),  # only rank 1's 3rd loss is NaN
        capture_output=True,
        text=True,
        timeout=240,
    )
    err = proc.stderr
    assert proc.returncode != 0
    assert exit_codes(err) == {0: 5, 1: 5}, err[-3000:]  # TrainingDiverged on both
    said = [line for line in err.splitlines() if line.startswith("retinaflow:")]
    assert len(said) == 1, err[-3000:]  # said once, by rank 0, with a hint for this config after the "; "
    assert said[0].startswith(
        "retinaflow: error: loss became non-finite at iteration 3; "
        f"stopped, the last good checkpoint is kept at {ckpt}; "
    ), said
    assert sorted(logged_losses(err)) == [1, 2]
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert writes(tmp_path) == [f"0 {ckpt}"]  # the save after iteration 2 only


_CHANGED = re.compile(r"was trained on (\d) rank\(s\), resuming on (\d): global batch 4, (\d) per rank")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_on_another_number_of_ranks_keeps_the_global_batch(synth_small, tmp_path, backend):
    cfg = _config(synth_small, tmp_path, iters=6, checkpoint_every=10_000)
    ckpt = tmp_path / "run" / "m.pth"
    steps = [(0, 2, []), (2, 4, [("1", "2", "2")]), (0, 6, [("2", "1", "4")])]  # 1 rank, 2 ranks, 1 rank
    for nproc, iters, warned in steps:
        args = (str(ckpt), "--config", str(cfg), "--iters", str(iters))
        proc = run_train(tmp_path, backend, *args, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _CHANGED.findall(proc.stderr) == warned, proc.stderr[-3000:]  # said once, by rank 0
        assert sorted(logged_losses(proc.stderr)) == list(range(iters - 1, iters + 1))
        assert all(math.isfinite(v) for v in logged_losses(proc.stderr).values())
        state = load_checkpoint(ckpt)
        assert (state["iteration"], state["world_size"]) == (iters, max(nproc, 1))
        assert state["config"]["train"]["batch"] == 4
