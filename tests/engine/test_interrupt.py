"""A training killed with SIGTERM (as a scheduler or `kubectl delete` does) checkpoints and resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tests.conftest import tiny_config

from retinaflow.engine.checkpoint import load_checkpoint

_ITER = re.compile(r"\biter (\d+) ")


def _train_cmd(ckpt: Path, cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "retinaflow", "train", str(ckpt), "--config", str(cfg), *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.mark.timeout(240)
def test_sigterm_checkpoints_and_the_same_command_resumes(synth_small, tmp_path):
    cfg = tiny_config(synth_small, iters=200)
    cfg.train.checkpoint_every = 10_000  # only the signal handler can save
    cfg.dump(tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    ckpt = out / "m.pth"

    proc = subprocess.Popen(
        _train_cmd(ckpt, tmp_path / "cfg.yaml"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    progressed = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = _ITER.search(line)
            if m and int(m.group(1)) >= 3:
                progressed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert progressed.wait(timeout=90), "".join(lines)[-3000:]
        assert not ckpt.exists()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    err = "".join(lines)

    assert code == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    messages = [line for line in err.splitlines() if line.startswith("retinaflow:")]
    assert len(messages) == 1, err[-3000:]
    assert str(ckpt) in messages[0] and "resume" in messages[0], messages[0]
    stopped = load_checkpoint(ckpt)["iteration"]
    assert 3 <= stopped < 200
    assert f"interrupted at iteration {stopped};" in messages[0]
    assert sorted(p.name for p in out.iterdir()) == ["m.pth"]  # no temporary file left behind

    target = stopped + 2
    proc2 = subprocess.run(
        _train_cmd(ckpt, tmp_path / "cfg.yaml", "--iters", str(target)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert load_checkpoint(ckpt)["iteration"] == target
    logged = sorted({int(m) for m in _ITER.findall(proc2.stderr)})
    assert logged == [stopped + 1, target], proc2.stderr[-3000:]  # continued, not restarted
