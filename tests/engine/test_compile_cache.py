"""``train.compile_cache``: a second training process on a fresh inductor cache directory compiles nothing
itself when it starts from the first one's artifact file; the file keeps one set of artifacts per device,
each rank loads its own and adds it when it compiled."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from tests.conftest import tiny_config
from torch import distributed as dist
from torch import multiprocessing as mp

pytestmark = pytest.mark.slow


def _train(tmp_path, cfg_path, ckpt, cache_dir):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "retinaflow", "train", str(ckpt), "--config", str(cfg_path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.timeout(900)
def test_a_fresh_process_reuses_the_compile_artifacts(synth_small, tmp_path):
    cfg = tiny_config(synth_small, iters=2)
    cfg.train.compile = "inductor"
    cfg.train.checkpoint_every = 0
    cache = tmp_path / "cache" / "compile.bin"
    cfg.train.compile_cache = str(cache)
    cfg.dump(tmp_path / "cfg.yaml")

    first = _train(tmp_path, tmp_path / "cfg.yaml", tmp_path / "a.pth", tmp_path / "inductor-a")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "does not exist yet" in first.stderr and "written to" in first.stderr, first.stderr[-3000:]
    assert cache.stat().st_size > 0

    # another machine: an empty inductor cache directory, only the artifact file
    second = _train(tmp_path, tmp_path / "cfg.yaml", tmp_path / "b.pth", tmp_path / "inductor-b")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "artifacts for cpu loaded from" in second.stderr, second.stderr[-3000:]
    assert "written to" not in second.stderr, second.stderr[-3000:]  # nothing compiled anew
    # the whole training graph came from the file: no AOTAutograd trace, no inductor compile
    cached = r"compile: first step [\d.]+ s; AOTAutograd cache (\d+) hit / 0 miss / 0 bypass"
    found = re.search(cached, second.stderr)
    assert found and int(found.group(1)) >= 1, second.stderr[-3000:]
    assert "loading compiled code" in second.stderr, second.stderr[-3000:]  # what the warm start cost


def test_an_unreadable_cache_file_costs_a_compile_not_the_run(tmp_path, caplog):
    from retinaflow.engine import compile_cache

    cpu = torch.device("cpu")
    bad = tmp_path / "compile.bin"
    bad.write_bytes(b"not a cache")  # no header: an older file's one set, which PyTorch cannot read
    with caplog.at_level("WARNING", logger="retinaflow.engine.compile_cache"):
        assert compile_cache.load(bad, cpu) == 0
    assert f"cannot read {bad}" in caplog.text and "compiling without it" in caplog.text
    caplog.clear()
    compile_cache.write(bad, {"cpu": b"12345"})
    bad.write_bytes(bad.read_bytes()[:-2])  # torn
    with pytest.raises(ValueError, match="a torn write"):
        compile_cache.read(bad)
    with caplog.at_level("WARNING", logger="retinaflow.engine.compile_cache"):
        assert compile_cache.load(bad, cpu) == 0
    assert f"cannot read {bad}" in caplog.text
    assert compile_cache.load(tmp_path / "absent.bin", cpu) == 0


def test_the_file_keeps_one_set_of_artifacts_per_device(tmp_path, caplog):
    from retinaflow.engine import compile_cache

    path = tmp_path / "compile.bin"
    sets = {"cuda:0": b"zero", "cuda:1": b"", "cuda:2": b"two\nwith a newline"}
    compile_cache.write(path, sets)
    assert compile_cache.read(path) == sets
    assert [p.name for p in tmp_path.iterdir()] == ["compile.bin"]  # no temporary file left
    assert compile_cache.device_key(torch.device("cuda", 1)) == "cuda:1"
    assert compile_cache.device_key(torch.device("cpu")) == "cpu"
    # a device the file has nothing for compiles (and says so); it does not load another device's set
    with caplog.at_level("INFO", logger="retinaflow.engine.compile_cache"):
        assert compile_cache.load(path, torch.device("cuda", 7)) == 0
    assert "no artifacts for cuda:7 (only cuda:0, cuda:1, cuda:2); compiling them" in caplog.text
    path.write_bytes(b"one older set")  # a file without the header: every device's
    assert compile_cache.read(path) == {compile_cache.ANY_DEVICE: b"one older set"}


def _save_worker(rank: int, port: int, root: str, out: dict) -> None:
    """Rank ``rank`` of 2 drives "cuda:<rank>" (a name only: the artifacts are compiled for this CPU).
    Round 1: only rank 1 compiles; round 2: rank 0 too. Both call save() each round, as the trainer does."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{root}/inductor-{rank}"
    torch.set_num_threads(1)
    from retinaflow.engine import compile_cache
    from retinaflow.engine.distributed import DistInfo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(
        rank=rank, world_size=2, local_rank=rank, local_world_size=2, device=torch.device("cuda", rank)
    )
    path = f"{root}/compile.bin"
    for round_ in (1, 2):
        if rank == 1 or round_ == 2:
            torch.compile(lambda x, k=rank + round_: x * k + 1)(torch.randn(8))
        wrote = compile_cache.save(path, info)
        dist.barrier()
        if rank == 0:
            out[round_] = (wrote, sorted(compile_cache.read(path)))
    dist.destroy_process_group()


def test_every_device_adds_its_own_artifacts_to_the_file(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_save_worker, args=(port, str(tmp_path), out), nprocs=2, join=True)
        rounds = dict(out)
    # round 1: rank 0 compiled nothing, yet the file it writes holds rank 1's device's artifacts
    assert rounds[1] == (True, ["cuda:1"])
    # round 2: rank 0's device added, rank 1's kept
    assert rounds[2] == (True, ["cuda:0", "cuda:1"])


def test_the_first_step_log_names_the_time_of_each_compile_phase(monkeypatch):
    from torch._dynamo import utils

    from retinaflow.engine import compile_cache

    metrics = {"bytecode_tracing": [1.0, 0.5], "PyCodeCache.load_by_key_path": [3.0], "gc": [9.0]}
    monkeypatch.setattr(utils, "compilation_time_metrics", metrics)
    assert compile_cache.phase_seconds() == {"bytecode_tracing": 1.5, "PyCodeCache.load_by_key_path": 3.0}
    assert compile_cache.outcome().endswith("bypass; dynamo tracing 1.5 s, loading compiled code 3.0 s")
    monkeypatch.setattr(utils, "compilation_time_metrics", {})
    assert compile_cache.outcome().endswith("bypass")
