"""DDP through torchrun on 2 processes: gloo on the CPU (CI) and NCCL on 2 GPUs (``gpu``, skipped without
them). Train, checkpoint on rank 0 only, resume, validate; the batch split check.

Each test launches real worker processes, so it also covers process-group set-up, the all-reduced loss
normaliser, the barrier after a checkpoint, the stop/non-finite flag all-reduce at the check points, the
loss averaged over ranks at log steps and the validation gather. The helpers here (launch environment,
test hooks, log parsing) serve test_distributed_faults.py and the pipeline's train step test too.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import tiny_config

from retinaflow.engine.checkpoint import load_checkpoint

NCCL = pytest.param(
    "nccl",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
    ],
)
BACKENDS = ["gloo", NCCL]  # parametrize("backend", BACKENDS): gloo on CPU processes, NCCL on cuda:0/1

# Loaded into every process of a run (sitecustomize), none of it reachable from a user's config:
# - RF_TEST_WRITES: logs "RANK target" for each os.replace/os.rename onto a .pth file, i.e. for each
#   checkpoint written (save_checkpoint renames a temporary file over it);
# - RF_TEST_PAUSE="R:K": rank R, after its K-th training step, creates RF_TEST_DIR/paused and waits
#   for RF_TEST_DIR/go (so a test can signal a rank at a known iteration, however fast the device);
# - RF_TEST_NAN="R:K": rank R's K-th loss is multiplied by NaN (before backward);
# - RF_TEST_EXACT_NORM=1: the loss normaliser waits for this step's all-reduced foreground count (the
#   trainer's D.LaggedMean uses the previous step's and corrects the gradients after backward).
_SHIM = """\
import os
import sys
import time


def _spy(event, args):
    if event == "os.rename" and str(args[1]).endswith(".pth"):
        with open(os.environ["RF_TEST_WRITES"], "a") as fh:
            fh.write(f"{os.environ.get('RANK', '-')} {args[1]}\\n")


if os.environ.get("RF_TEST_WRITES"):
    sys.addaudithook(_spy)


def _at(name):
    rank, _, k = os.environ.get(name, "").partition(":")
    return int(k) if k and rank == os.environ.get("RANK") else 0


_PAUSE, _NAN = _at("RF_TEST_PAUSE"), _at("RF_TEST_NAN")
if _PAUSE or _NAN:
    import retinaflow.engine.train as _train

    _step, _loss, _calls = _train._Trainer.step, _train.detection_loss, {"step": 0, "loss": 0}

    def _paused_step(self, batch):
        out = _step(self, batch)
        _calls["step"] += 1
        if _calls["step"] == _PAUSE:
            folder = os.environ["RF_TEST_DIR"]
            open(os.path.join(folder, "paused"), "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < deadline:
                time.sleep(0.02)
        return out

    def _nan_loss(*args, **kwargs):
        out = _loss(*args, **kwargs)
        _calls["loss"] += 1
        if _calls["loss"] == _NAN:
            out["loss"] = out["loss"] * float("nan")
        return out

    _train._Trainer.step = _paused_step
    _train.detection_loss = _nan_loss

if os.environ.get("RF_TEST_EXACT_NORM"):
    import retinaflow.engine.distributed as _dist

    def _exact(self, local):
        self.previous = None  # always the first step's path: wait for this step's mean
        return _lagged(self, local)

    _lagged = _dist.LaggedMean.__call__
    _dist.LaggedMean.__call__ = _exact
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_env(tmp_path: Path, backend: str, **hooks: str) -> dict[str, str]:
    """Environment of a test run on ``backend``: the shim on PYTHONPATH, ``RF_TEST_<HOOK>`` from ``hooks``."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SHIM)
    env = dict(os.environ, OMP_NUM_THREADS="1", RF_TEST_WRITES=str(tmp_path / "writes"))
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["NCCL_NVLS_ENABLE"] = "0"
    env["RF_TEST_DIR"] = str(tmp_path)
    env.update({f"RF_TEST_{name.upper()}": value for name, value in hooks.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH")) if p)
    return env


def train_cmd(*args: str, nproc: int = 2, log_dir: Path | None = None) -> list[str]:
    """``retinaflow train ARGS`` under torchrun with ``nproc`` workers (plain Python for ``nproc=0``)."""
    if nproc == 0:
        return [sys.executable, "-m", "retinaflow", "train", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if log_dir is not None:  # worker stderr into log_dir/**/<local rank>/stderr.log
        launcher += ["--log-dir", str(log_dir), "--redirects", "2"]
    return [*launcher, "-m", "retinaflow", "train", *args]


def run_train(
    tmp_path: Path, backend: str, *args: str, nproc: int = 2, log_dir: Path | None = None, **hooks: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(*args, nproc=nproc, log_dir=log_dir),
        env=launch_env(tmp_path, backend, **hooks),
        capture_output=True,
        text=True,
        timeout=240,
    )


def logged_losses(stderr: str) -> dict[int, float]:
    """iteration -> loss from the rank-0 log lines ``iter N ... loss=X ...`` (each must appear once)."""
    found = re.findall(r"\biter (\d+) .*?\bloss=(\S+)", stderr)
    iterations = [int(i) for i, _ in found]
    assert len(iterations) == len(set(iterations)), f"an iteration was logged twice: {iterations}"
    return {int(i): float(v) for i, v in found}


def writes(tmp_path: Path) -> list[str]:
    """Checkpoint writes ("RANK path") since the last call."""
    log = tmp_path / "writes"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_rank_ddp_trains_checkpoints_on_rank0_and_resumes(synth_small, tmp_path, backend):
    cfg = tiny_config(synth_small, iters=3)
    cfg.train.batch = 4  # global: 2 images per rank
    cfg.train.checkpoint_every = 2  # a mid-run save (then the barrier) as well as the final one
    cfg.dump(tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "m.pth"

    proc = run_train(tmp_path, backend, str(ckpt), "--config", str(tmp_path / "cfg.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 3
    assert state["config"]["train"]["batch"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["m.pth"]  # no temporary files left behind
    # every save happened once, on rank 0: after iteration 2 and at the end
    assert writes(tmp_path) == [f"0 {ckpt}"] * 2
    device = "cpu" if backend == "gloo" else "cuda"
    how = "after backward (train.grad_sync=auto: one node)"  # the default on one node, without plain BN
    summary = f"2 ranks ({device}, {backend}): global batch 4, 2 per rank; gradients averaged {how}"
    assert proc.stderr.count(summary) == 1, proc.stderr[-3000:]  # said once, by rank 0
    losses = logged_losses(proc.stderr)
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(v) for v in losses.values()), losses

    # resume on 2 ranks, validating at the end (detections gathered from both ranks onto rank 0)
    proc = run_train(
        tmp_path,
        backend,
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
    assert writes(tmp_path) == [f"0 {ckpt}"] * 2  # after iteration 4 and at the end
    losses = logged_losses(proc.stderr)
    assert sorted(losses) == [4, 5]  # resumed, not restarted
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert len(re.findall(r"iteration 5: validation mAP \d", proc.stderr)) == 1, proc.stderr[-3000:]


def _sgd_config(synth: Any, tmp_path: Path) -> tuple[str, ...]:
    """CLI arguments of a 4-iteration SGD run (the update is linear in the gradient, so a gradient off by
    any factor shows; AdamW would normalise a constant factor away)."""
    cfg = tiny_config(synth, iters=4)
    cfg.train.batch, cfg.train.checkpoint_every = 4, 0
    cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay = "sgd", 0.01, 0.0
    cfg.dump(tmp_path / "cfg.yaml")
    return ("--config", str(tmp_path / "cfg.yaml"))


def _trained(
    tmp_path: Path, backend: str, name: str, *args: str, start: Path | None = None, **hooks: str
) -> dict[str, torch.Tensor]:
    """The weights of a 2-rank run into ``name``.pth (resuming a copy of ``start`` if given)."""
    ckpt = tmp_path / f"{name}.pth"
    if start is not None:
        shutil.copy(start, ckpt)
    proc = run_train(tmp_path, backend, str(ckpt), *args, **hooks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(ckpt)["model"]


def _assert_same_training(
    start: dict[str, torch.Tensor], a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], backend: str
) -> None:
    """``a`` and ``b`` trained from ``start`` alike: on the CPU (gloo) to float32 rounding; on GPUs (bf16
    autocast, cuDNN's TF32 and atomics, NCCL's reduction order) to 1 % of each tensor's largest update
    since ``start``. A gradient off by a step's normaliser or a rank's share is off by tens of percent."""
    for name, value in b.items():
        if not value.is_floating_point():
            continue
        update = (value - start[name]).abs().max().item()
        difference = (a[name] - value).abs().max().item()
        assert difference <= 0.01 * update + 1e-7, (name, difference, update)
        if backend == "gloo":
            torch.testing.assert_close(a[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_lagged_loss_normaliser_trains_as_the_exact_one(synth_small, tmp_path, backend):
    """The foreground mean applied after backward (no mid-step wait between ranks) gives the weights that
    normalising each step by its own all-reduced mean gives, over steps whose counts differ. Both resume
    one common first step, whose weights measure the update (with the correction removed, the CPU
    variant is off by 75 % of it)."""
    config = _sgd_config(synth_small, tmp_path)
    start = tmp_path / "start.pth"
    _trained(tmp_path, backend, "start", *config, "--iters", "1", exact_norm="1")
    lagged = _trained(tmp_path, backend, "lagged", *config, start=start)
    exact = _trained(tmp_path, backend, "exact", *config, start=start, exact_norm="1")
    _assert_same_training(load_checkpoint(start)["model"], lagged, exact, backend)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_averaged_after_backward_train_as_ddp(synth_small, tmp_path, backend):
    """``train.grad_sync=after_backward`` (flat all-reduces after backward, no DDP) gives DDP's weights.
    It starts from scratch, where each rank draws other initial weights: only rank 0's broadcast makes it
    equal DDP's run (resumed from DDP's first step, whose weights measure the update)."""
    config = _sgd_config(synth_small, tmp_path)
    by_ddp = (*config, "--set", "train.grad_sync=ddp")
    start = tmp_path / "start.pth"
    _trained(tmp_path, backend, "start", *by_ddp, "--iters", "1")
    ddp = _trained(tmp_path, backend, "ddp", *by_ddp, start=start)
    after = _trained(tmp_path, backend, "after", *config, "--set", "train.grad_sync=after_backward")
    _assert_same_training(load_checkpoint(start)["model"], after, ddp, backend)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_batch_must_divide_by_the_number_of_ranks(synth_small, tmp_path, backend):
    cfg = tiny_config(synth_small, iters=2)
    cfg.train.batch = 3
    cfg.dump(tmp_path / "cfg.yaml")
    logs = tmp_path / "logs"
    ckpt = tmp_path / "m.pth"
    proc = run_train(tmp_path, backend, str(ckpt), "--config", str(tmp_path / "cfg.yaml"), log_dir=logs)
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("grad_sync", "shapes", "logged"),
    [
        ("ddp", "one", "compile: the DDP model's graph split at its 100 MB buckets"),
        ("ddp", "several", "DDP model (dynamo's bucket split off: it fails on symbolic sizes)"),
        ("after_backward", "several", "one graph; gradients averaged after backward (train.grad_sync)"),
    ],
    ids=["ddp", "ddp_several_shapes", "after_backward"],
)
def test_compiled_ddp_trains(synth_small, tmp_path, backend, grad_sync, shapes, logged):
    """``--compile`` on several ranks trains: finite losses on rank 0, one checkpoint. With DDP the model
    is compiled split at DDP's (100 MB) buckets (measured faster on two H100s than one graph or the 25 MB
    buckets), except on several padded shapes: dynamo's split fails on symbolic sizes, so one graph. With
    gradients averaged after backward it is one graph, as on one GPU. Several shapes also put the batch
    in pad-stride blocks (the default train.compile_shapes) inside DDP."""
    cfg = tiny_config(synth_small, iters=2)
    cfg.train.batch, cfg.train.grad_sync = 4, grad_sync
    if shapes == "several":
        cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 96, 192, (64, 128)  # four bucket shapes
    cfg.train.compile = "eager"  # dynamo's graph capture (where the split happens), no code generation
    # every rank takes part in the cache file's rewrite decision (after the first step, at checkpoints)
    cfg.train.compile_cache = str(tmp_path / "compile.bin")
    cfg.dump(tmp_path / "cfg.yaml")
    ckpt = tmp_path / "m.pth"
    proc = run_train(tmp_path, backend, str(ckpt), "--config", str(tmp_path / "cfg.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged in proc.stderr, proc.stderr[-3000:]
    losses = logged_losses(proc.stderr)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses
    assert load_checkpoint(ckpt)["iteration"] == 2


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_compile_their_packages_then_start_from_them(synth_small, tmp_path, backend):
    """``train.compile_package`` on 2 ranks of one node (gradients averaged after backward, one graph): the
    first launch compiles each rank's package at its first step and trains through it, and the file keeps
    one package per device; the second launch loads them, every batch of both ranks runs through them, and
    it trains to the first launch's weights."""
    from retinaflow.engine import compile_cache

    cfg = tiny_config(synth_small, iters=2)
    cfg.train.batch, cfg.train.grad_sync = 4, "after_backward"
    cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 96, 192, (64, 128)  # several padded shapes
    cfg.train.compile, cfg.train.compile_package = "eager", True
    cache = tmp_path / "compile.bin"
    cfg.train.compile_cache = str(cache)
    cfg.dump(tmp_path / "cfg.yaml")
    weights = []
    for run, done in (("first", "compile package: compiled in"), ("second", "package loaded from")):
        ckpt = tmp_path / f"{run}.pth"
        proc = run_train(tmp_path, backend, str(ckpt), "--config", str(tmp_path / "cfg.yaml"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count(done) == 2, proc.stderr[-3000:]  # each rank
        assert proc.stderr.count("2 batches ran through it, 0 through the compiled network") == 2, proc.stderr
        weights.append(load_checkpoint(ckpt)["model"])
        if run == "first":
            devices = ["cpu"] if backend == "gloo" else ["cuda:0", "cuda:1"]
            assert {f"{d} package" for d in devices} <= set(compile_cache.read(cache)), compile_cache.read(
                cache
            )
    for key, value in weights[0].items():
        if backend == "gloo":
            assert torch.equal(weights[1][key], value), key
        else:  # GPU kernels need not be bitwise reproducible
            torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-5)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", [NCCL])
def test_each_gpu_starts_from_its_own_artifacts_in_the_compile_cache(synth_small, tmp_path, backend):
    """``train.compile_cache`` on 2 GPUs, each launch on an empty inductor cache directory (a fresh pod):
    a 1-GPU run writes cuda:0's artifacts; a 2-GPU run loads them on rank 0, compiles on rank 1 (the
    artifacts are specific to the GPU index) and adds cuda:1's; the next 2-GPU run loads both and
    compiles nothing."""
    from retinaflow.engine import compile_cache

    cfg = tiny_config(synth_small, iters=2)
    cfg.train.batch, cfg.train.compile, cfg.train.checkpoint_every = 4, "inductor", 0
    cache = tmp_path / "compile.bin"
    cfg.train.compile_cache = str(cache)
    cfg.dump(tmp_path / "cfg.yaml")

    def launch(name: str, nproc: int) -> str:
        env = launch_env(tmp_path, backend) | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}")}
        config = ("--config", str(tmp_path / "cfg.yaml"))
        batch = ("--batch", str(2 * nproc))  # 2 images per GPU: the same graph on every GPU
        cmd = train_cmd(str(tmp_path / f"{name}.pth"), *config, *batch, nproc=nproc)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    launch("one", 1)
    assert sorted(compile_cache.read(cache)) == ["cuda:0"]
    second = launch("two", 2)
    assert "artifacts for cuda:0 loaded" in second, second[-3000:]
    assert re.search(r"AOTAutograd cache [1-9]\d* hit / 0 miss", second), second[-3000:]  # rank 0's log
    assert "no artifacts for cuda:1 (only cuda:0); compiling them" in second, second[-3000:]
    assert sorted(compile_cache.read(cache)) == ["cuda:0", "cuda:1"]
    third = launch("three", 2)
    for gpu in ("cuda:0", "cuda:1"):
        assert f"artifacts for {gpu} loaded" in third, third[-3000:]
    assert "written to" not in third, third[-3000:]  # no rank compiled anything
