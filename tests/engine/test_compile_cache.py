"""``train.compile_cache``: a second training process on a fresh inductor cache directory compiles nothing
itself when it starts from the first one's artifact file."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from tests.conftest import tiny_config

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
    assert "artifacts loaded from" in second.stderr, second.stderr[-3000:]
    assert "written to" not in second.stderr, second.stderr[-3000:]  # nothing compiled anew
    # the whole training graph came from the file: no AOTAutograd trace, no inductor compile
    cached = r"compile: first step [\d.]+ s; AOTAutograd cache (\d+) hit / 0 miss / 0 bypass"
    found = re.search(cached, second.stderr)
    assert found and int(found.group(1)) >= 1, second.stderr[-3000:]
    assert "loading compiled code" in second.stderr, second.stderr[-3000:]  # what the warm start cost


def test_an_unreadable_cache_file_costs_a_compile_not_the_run(tmp_path, caplog):
    from retinaflow.engine import compile_cache

    bad = tmp_path / "compile.bin"
    bad.write_bytes(b"not a cache")
    with caplog.at_level("WARNING", logger="retinaflow.engine.compile_cache"):
        assert compile_cache.load(bad) == 0
    assert f"cannot read {bad}" in caplog.text and "compiling without it" in caplog.text
    assert compile_cache.load(tmp_path / "absent.bin") == 0


def test_the_first_step_log_names_the_time_of_each_compile_phase(monkeypatch):
    from torch._dynamo import utils

    from retinaflow.engine import compile_cache

    metrics = {"bytecode_tracing": [1.0, 0.5], "PyCodeCache.load_by_key_path": [3.0], "gc": [9.0]}
    monkeypatch.setattr(utils, "compilation_time_metrics", metrics)
    assert compile_cache.phase_seconds() == {"bytecode_tracing": 1.5, "PyCodeCache.load_by_key_path": 3.0}
    assert compile_cache.outcome().endswith("bypass; dynamo tracing 1.5 s, loading compiled code 3.0 s")
    monkeypatch.setattr(utils, "compilation_time_metrics", {})
    assert compile_cache.outcome().endswith("bypass")
