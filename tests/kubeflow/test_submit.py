"""`retinaflow pipeline submit` builds the right kfp.Client calls (a fake client: no KFP server runs here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from retinaflow.cli import main
from retinaflow.errors import ConfigError
from retinaflow.kubeflow import submit as submit_mod
from retinaflow.kubeflow.params import config_arguments, parse_params
from retinaflow.kubeflow.pipeline import PIPELINE_NAME
from retinaflow.kubeflow.submit import PipelineRunFailed, SubmitOptions, kfp_cron, submit

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"images": "s3://data/train", "annotations": "s3://data/train.json"}


class FakeClient:
    """Records every call; answers like the KFP v2beta1 API objects (only the fields submit reads)."""

    def __init__(self, existing: bool = False, states: tuple[str, ...] = ("SUCCEEDED",)) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.existing = existing
        self.states = list(states)
        self.uploaded: dict = {}

    def _record(self, call: str, **kwargs) -> None:
        self.calls.append((call, kwargs))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def kwargs(self, name: str) -> dict:
        return next(k for n, k in self.calls if n == name)

    def get_pipeline_id(self, name):
        self._record("get_pipeline_id", name=name)
        return "pipe-1" if self.existing else None

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None):
        self._record(
            "upload_pipeline", pipeline_package_path=pipeline_package_path, pipeline_name=pipeline_name
        )
        self.uploaded = yaml.safe_load(Path(pipeline_package_path).read_text().split("\n---\n")[0])
        return SimpleNamespace(pipeline_id="pipe-1")

    def list_pipeline_versions(self, pipeline_id, **kwargs):
        self._record("list_pipeline_versions", pipeline_id=pipeline_id, **kwargs)
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id="ver-1")])

    def upload_pipeline_version(self, pipeline_package_path, pipeline_version_name, pipeline_id=None):
        self._record("upload_pipeline_version", version=pipeline_version_name, pipeline_id=pipeline_id)
        self.uploaded = yaml.safe_load(Path(pipeline_package_path).read_text().split("\n---\n")[0])
        return SimpleNamespace(pipeline_version_id="ver-2")

    def create_experiment(self, name, namespace=None):
        self._record("create_experiment", name=name, namespace=namespace)
        return SimpleNamespace(experiment_id="exp-1")

    def run_pipeline(self, **kwargs):
        self._record("run_pipeline", **kwargs)
        return SimpleNamespace(run_id="run-1")

    def create_recurring_run(self, **kwargs):
        self._record("create_recurring_run", **kwargs)
        return SimpleNamespace(recurring_run_id="rec-1")

    def get_run(self, run_id):
        self._record("get_run", run_id=run_id)
        return SimpleNamespace(state=self.states.pop(0) if len(self.states) > 1 else self.states[0])


def test_first_submit_uploads_the_pipeline_and_starts_a_run():
    client = FakeClient()
    result = submit(SubmitOptions(host="http://kfp", arguments=dict(REQUIRED), experiment="exp"), client)
    assert client.names() == [
        "get_pipeline_id", "upload_pipeline", "list_pipeline_versions", "create_experiment", "run_pipeline"
    ]  # fmt: skip
    assert client.kwargs("upload_pipeline")["pipeline_name"] == PIPELINE_NAME
    assert client.uploaded["pipelineInfo"]["name"] == PIPELINE_NAME
    run = client.kwargs("run_pipeline")
    assert run["params"] == REQUIRED and run["pipeline_id"] == "pipe-1" and run["version_id"] == "ver-1"
    assert run["experiment_id"] == "exp-1" and run["enable_caching"] is False
    assert (result.run_id, result.state) == ("run-1", "")


def test_next_submit_uploads_a_new_version(monkeypatch):
    monkeypatch.setenv("GITHUB_SHA", "0123456789abcdef")
    client = FakeClient(existing=True)
    result = submit(SubmitOptions(host="http://kfp", arguments=dict(REQUIRED)), client)
    assert "upload_pipeline" not in client.names()
    version = client.kwargs("upload_pipeline_version")
    assert version["pipeline_id"] == "pipe-1" and version["version"].endswith("-01234567")
    assert client.kwargs("run_pipeline")["version_id"] == "ver-2" == result.version_id


def test_schedule_creates_a_recurring_run_with_kfp_cron():
    client = FakeClient(existing=True)
    result = submit(SubmitOptions(host="h", arguments=dict(REQUIRED), schedule="0 3 * * 1"), client)
    rec = client.kwargs("create_recurring_run")
    assert (
        rec["cron_expression"] == "0 0 3 * * 1" and rec["max_concurrency"] == 1 and rec["no_catchup"] is True
    )
    assert "run_pipeline" not in client.names() and result.recurring_run_id == "rec-1"


def test_wait_follows_the_run_until_it_succeeds():
    client = FakeClient(existing=True, states=("PENDING", "RUNNING", "SUCCEEDED"))
    opts = SubmitOptions(host="h", arguments=dict(REQUIRED), wait=True, poll_seconds=0)
    assert submit(opts, client).state == "SUCCEEDED"
    assert client.names().count("get_run") == 3


@pytest.mark.parametrize("state", ["FAILED", "CANCELED"])
def test_wait_raises_when_the_run_does_not_succeed(state):
    client = FakeClient(existing=True, states=("RUNNING", state))
    with pytest.raises(PipelineRunFailed, match=state):
        submit(SubmitOptions(host="h", arguments=dict(REQUIRED), wait=True, poll_seconds=0), client)


def test_wait_times_out():
    client = FakeClient(existing=True, states=("RUNNING",))
    with pytest.raises(PipelineRunFailed, match="still RUNNING"):
        submit(
            SubmitOptions(host="h", arguments=dict(REQUIRED), wait=True, timeout=0, poll_seconds=0), client
        )


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (SubmitOptions(host="h", arguments={"images": "x"}), "missing pipeline parameter"),
        (
            SubmitOptions(host="h", arguments=dict(REQUIRED), schedule="0 3 * * 1", wait=True),
            "cannot be combined",
        ),
        (SubmitOptions(host="h", arguments=dict(REQUIRED), schedule="daily"), "cron expression"),
    ],
)
def test_bad_requests_fail_before_any_call(opts, message):
    client = FakeClient()
    with pytest.raises(ConfigError, match=message):
        submit(opts, client)
    assert client.calls == []


def test_cron_conversion():
    assert kfp_cron("*/15 * * * *") == "0 */15 * * * *"
    assert kfp_cron("30 0 3 * * *") == "30 0 3 * * *"


def test_params_are_typed_from_the_pipeline_signature():
    parsed = parse_params(["iters=500", "lr=0.02", "build_trt_engine=false", "classes=cat, dog", "gpus=8"])
    assert parsed == {
        "iters": 500,
        "lr": 0.02,
        "build_trt_engine": False,
        "classes": ["cat", "dog"],
        "gpus": 8,
    }
    with pytest.raises(ConfigError, match="unknown pipeline parameter 'iteration'"):
        parse_params(["iteration=5"])
    with pytest.warns(FutureWarning, match="iterations is now iters"):  # the old name, renamed
        assert parse_params(["iterations=5"]) == {"iters": 5}
    with pytest.raises(ConfigError, match="expects a integer"):
        parse_params(["batch=big"])


def test_config_file_becomes_pipeline_arguments():
    from retinaflow.config import Config

    preset = Config.load("synthetic_cpu")
    args = config_arguments(preset)
    assert args["backbone"] == preset.model.backbone and args["iters"] == preset.train.iters
    rebuilt = Config().override(args["overrides"])
    assert rebuilt.model.fpn_channels == preset.model.fpn_channels
    assert rebuilt.data.jitter == preset.data.jitter and rebuilt.train.milestones == preset.train.milestones


def test_cli_submit_wait_exit_codes(monkeypatch, capsys):
    clients = [FakeClient(states=("SUCCEEDED",)), FakeClient(states=("FAILED",))]
    monkeypatch.setattr(submit_mod, "make_client", lambda host, namespace=None: clients.pop(0))
    argv = ["pipeline", "submit", "--host", "http://kfp", "--param", "images=s3://d/i", "--param",
            "annotations=s3://d/a.json", "--config", "synthetic_cpu", "--param", "iters=7",
            "--wait"]  # fmt: skip
    assert main(argv) == 0
    assert "state: SUCCEEDED" in capsys.readouterr().out
    assert main(argv) == PipelineRunFailed.exit_code != 0
    assert "ended FAILED" in capsys.readouterr().err


def test_retrain_workflow_submits_and_waits():
    workflow = yaml.safe_load((REPO / ".github/workflows/retrain.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert "configs/**" in triggers["push"]["paths"] and triggers["schedule"]
    script = " ".join(step.get("run", "") for step in workflow["jobs"]["submit"]["steps"])
    assert "retinaflow pipeline submit" in script and "--wait" in script and "KFP_HOST" in script
    ci = yaml.safe_load((REPO / ".github/workflows/ci.yml").read_text())
    assert "pull_request" in ci[True]
    assert any("make test" in step.get("run", "") for step in ci["jobs"]["test"]["steps"])
