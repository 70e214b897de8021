"""DDP on 2 CPU processes (gloo) through torchrun: train, checkpoint on rank 0 only, resume, validate.

Each test launches real worker processes, so it also covers process-group set-up, the all-reduced loss
normaliser, the barrier after a checkpoint, the per-iteration stop-flag all-reduce and the validation
gather.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import tiny_config

from retinaflow.engine.checkpoint import load_checkpoint

# Loaded into every process of a run (sitecustomize): logs "RANK target" for each os.replace/os.rename
# onto a .pth file, i.e. for each checkpoint written (save_checkpoint renames a temporary file over it).
_WRITE_SPY = """\
import os
import sys

def _hook(event, args):
    if event == "os.rename" and str(args[1]).endswith(".pth"):
        with open(os.environ["RF_TEST_WRITES"], "a") as fh:
            fh.write(f"{os.environ.get('RANK', '-')} {args[1]}\\n")

sys.addaudithook(_hook)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(tmp_path: Path, *args: str, log_dir: Path | None = None) -> subprocess.CompletedProcess:
    spy = tmp_path / "spy"
    spy.mkdir(exist_ok=True)
    (spy / "sitecustomize.py").write_text(_WRITE_SPY)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["RF_TEST_WRITES"] = str(tmp_path / "writes")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(spy), env.get("PYTHONPATH")) if p)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    if log_dir is not None:  # worker stderr into log_dir/**/<local rank>/stderr.log
        launcher += ["--log-dir", str(log_dir), "--redirects", "2"]
    return subprocess.run(
        [*launcher, "-m", "retinaflow", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _logged_losses(stderr: str) -> dict[int, float]:
    """iteration -> loss from the rank-0 log lines ``iter N ... loss=X ...`` (each must appear once)."""
    found = re.findall(r"\biter (\d+) .*?\bloss=(\S+)", stderr)
    iterations = [int(i) for i, _ in found]
    assert len(iterations) == len(set(iterations)), f"an iteration was logged twice: {iterations}"
    return {int(i): float(v) for i, v in found}


def _writes(tmp_path: Path) -> list[str]:
    log = tmp_path / "writes"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


@pytest.mark.timeout(300)
def test_two_rank_ddp_trains_checkpoints_on_rank0_and_resumes(synth_small, tmp_path):
    cfg = tiny_config(synth_small, iters=3)
    cfg.train.batch = 4  # global: 2 images per rank
    cfg.train.checkpoint_every = 2  # a mid-run save (then the barrier) as well as the final one
    cfg.dump(tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "m.pth"

    proc = _torchrun(tmp_path, str(ckpt), "--config", str(tmp_path / "cfg.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 3
    assert state["config"]["train"]["batch"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["m.pth"]  # no temporary files left behind
    # every save happened once, on rank 0: after iteration 2 and at the end
    assert _writes(tmp_path) == [f"0 {ckpt}"] * 2
    losses = _logged_losses(proc.stderr)
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(v) for v in losses.values()), losses

    # resume on 2 ranks, validating at the end (detections gathered from both ranks onto rank 0)
    proc = _torchrun(
        tmp_path,
        str(ckpt),
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--iters",
        "5",
        "--val-images",
        str(synth_small.val_images),
        "--val-annotations",
        str(synth_small.val_annotations),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(ckpt)["iteration"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["m.pth"]
    assert _writes(tmp_path) == [f"0 {ckpt}"] * 2  # after iteration 4 and at the end
    losses = _logged_losses(proc.stderr)
    assert sorted(losses) == [4, 5]  # resumed, not restarted
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert len(re.findall(r"iteration 5: validation mAP \d", proc.stderr)) == 1, proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_global_batch_must_divide_by_the_number_of_ranks(synth_small, tmp_path):
    cfg = tiny_config(synth_small, iters=2)
    cfg.train.batch = 3
    cfg.dump(tmp_path / "cfg.yaml")
    logs = tmp_path / "logs"
    ckpt = tmp_path / "m.pth"
    proc = _torchrun(tmp_path, str(ckpt), "--config", str(tmp_path / "cfg.yaml"), log_dir=logs)
    assert proc.returncode != 0
    assert not ckpt.exists()
    # torchrun itself reports a failed worker with its own ChildFailedError traceback; what matters
    # is that each worker fails with the one-line message (exit code 2 = ConfigError), no traceback.
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    worker_logs = sorted(logs.glob("**/stderr.log"))
    assert len(worker_logs) == 2, proc.stderr[-3000:]
    for log in worker_logs:
        err = log.read_text()
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("retinaflow:")]
        assert lines == ["retinaflow: error: --batch 3 is not divisible by the 2 ranks"], err
