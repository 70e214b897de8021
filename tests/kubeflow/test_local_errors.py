"""A local pipeline run that cannot succeed fails fast, in one plain line naming the step and cause."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from retinaflow.errors import ConfigError
from retinaflow.kubeflow.local import LocalRunFailed, LocalRunOptions, run_failure, run_local
from retinaflow.kubeflow.params import check_arguments
from retinaflow.kubeflow.steps.common import FAILURE_LOG_ENV, reports_failure


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"iters": -5}, "train.iters must be positive"),
        ({"batch": 0}, "train.batch must be positive"),
        ({"overrides": ["train.nope=1"]}, "unknown config key"),
        ({"overrides": ["train.lr=fast"]}, "train.lr"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"nodes": 0}, "nodes"),
    ],
)
def test_invalid_parameters_are_refused_before_anything_runs(
    tmp_path: Path, arguments: dict, message: str
) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        run_local(LocalRunOptions(output=tmp_path / "run", images=8, arguments=arguments))
    assert time.monotonic() - started < 10
    assert not (tmp_path / "run").exists()  # no data synthesized, no step launched


def test_valid_parameters_pass_the_check() -> None:
    check_arguments({"iters": 10, "batch": 2, "overrides": ["train.lr=0.02"], "val_fraction": 0.2})


def test_a_failing_step_is_named_with_its_cause_in_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "failures.jsonl"
    monkeypatch.setenv(FAILURE_LOG_ENV, str(log))

    @reports_failure("train")
    def step() -> None:
        raise ConfigError("train iterations must be positive, got -5\nsecond line")

    with pytest.raises(ConfigError):
        step()
    assert json.loads(log.read_text()) == {
        "step": "train",
        "error": "train iterations must be positive, got -5",
    }
    kfp = RuntimeError(
        "Pipeline \x1b[95m'retinaflow-train'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m."
    )
    failure = run_failure(kfp, log)
    assert isinstance(failure, LocalRunFailed)
    assert str(failure) == "pipeline step train failed: train iterations must be positive, got -5"
    plain = str(run_failure(kfp, tmp_path / "none.jsonl"))
    assert "\x1b" not in plain and "retinaflow-train" in plain and "FAILURE" in plain


def test_failure_log_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAILURE_LOG_ENV, raising=False)

    @reports_failure("evaluate")
    def step() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        step()
    assert FAILURE_LOG_ENV not in os.environ
