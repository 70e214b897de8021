"""``retinaflow pipeline submit``: upload the pipeline (a new version) and start a run or a schedule.

Calls on ``kfp.Client``: ``get_pipeline_id``; then ``upload_pipeline`` (first time, plus
``list_pipeline_versions`` to learn its version) or ``upload_pipeline_version``; ``create_experiment``
(returns the existing one by name); then ``run_pipeline`` or ``create_recurring_run``; with ``wait``,
``get_run`` until the run reaches a final state.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retinaflow.errors import ConfigError, RetinaflowError
from retinaflow.kubeflow.params import check_required

log = logging.getLogger(__name__)

FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"}


class PipelineRunFailed(RetinaflowError):
    """A submitted run ended in a state other than SUCCEEDED, or did not finish in time."""

    exit_code = 7


@dataclass
class SubmitOptions:
    host: str
    arguments: dict[str, Any] = field(default_factory=dict)
    experiment: str = "retinaflow"
    pipeline_name: str = ""
    version_name: str = ""
    run_name: str = ""
    schedule: str = ""
    wait: bool = False
    timeout: float = 24 * 3600.0
    poll_seconds: float = 30.0
    namespace: str | None = None
    package: Path | None = None


@dataclass
class SubmitResult:
    pipeline_id: str
    version_id: str
    experiment_id: str
    run_id: str = ""
    recurring_run_id: str = ""
    state: str = ""


def kfp_cron(expr: str) -> str:
    """KFP schedules take 6 cron fields (seconds first); a standard 5-field expression gets ``0`` seconds."""
    fields = expr.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError(f"--schedule {expr!r} must be a cron expression of 5 (or 6, seconds first) fields")


def default_version_name(pipeline_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    sha = os.environ.get("GITHUB_SHA", "")[:8]
    return f"{pipeline_name}-{stamp}" + (f"-{sha}" if sha else "")


def make_client(host: str, namespace: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host``; ``KFP_TOKEN`` (if set) is sent as the bearer token."""
    import kfp

    return kfp.Client(
        host=host, existing_token=os.environ.get("KFP_TOKEN") or None, namespace=namespace or "kubeflow"
    )


def submit(opts: SubmitOptions, client: Any = None) -> SubmitResult:
    """Upload a pipeline version and start a run (or a recurring run); see the module doc."""
    from retinaflow.kubeflow.compile import compile_pipeline
    from retinaflow.kubeflow.pipeline import PIPELINE_NAME

    check_required(opts.arguments)
    if opts.schedule and opts.wait:
        raise ConfigError("--wait follows one run; it cannot be combined with --schedule")
    cron = kfp_cron(opts.schedule) if opts.schedule else ""
    name = opts.pipeline_name or PIPELINE_NAME
    client = client or make_client(opts.host, opts.namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = str(opts.package or compile_pipeline(Path(tmp) / "pipeline.yaml"))
        pipeline_id, version_id = _upload(
            client, package, name, opts.version_name or default_version_name(name)
        )
    experiment = client.create_experiment(opts.experiment, namespace=opts.namespace)
    result = SubmitResult(
        pipeline_id=pipeline_id, version_id=version_id, experiment_id=experiment.experiment_id
    )
    job_name = opts.run_name or f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    common = dict(
        experiment_id=experiment.experiment_id,
        job_name=job_name,
        params=dict(opts.arguments),
        pipeline_id=pipeline_id,
        version_id=version_id,
        enable_caching=False,
    )
    if cron:
        recurring = client.create_recurring_run(
            cron_expression=cron, max_concurrency=1, no_catchup=True, **common
        )
        result.recurring_run_id = recurring.recurring_run_id
        log.info("recurring run %s created (cron %s)", result.recurring_run_id, cron)
        return result
    run = client.run_pipeline(**common)
    result.run_id = run.run_id
    log.info("run %s started in experiment %s", run.run_id, opts.experiment)
    if opts.wait:
        result.state = wait_for_run(client, run.run_id, opts.timeout, opts.poll_seconds)
        if result.state != "SUCCEEDED":
            raise PipelineRunFailed(f"pipeline run {run.run_id} ended {result.state}")
    return result


def wait_for_run(client: Any, run_id: str, timeout: float, poll_seconds: float) -> str:
    """Poll ``client.get_run`` until a final state; returns it. Raises PipelineRunFailed on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        state = str(client.get_run(run_id).state or "").upper()
        if state in FINAL_STATES:
            log.info("run %s: %s", run_id, state)
            return state
        if time.monotonic() > deadline:
            raise PipelineRunFailed(f"pipeline run {run_id} still {state or 'pending'} after {timeout:.0f} s")
        time.sleep(poll_seconds)


def _upload(client: Any, package: str, name: str, version_name: str) -> tuple[str, str]:
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(
            package, pipeline_name=name, description="retinaflow training pipeline"
        )
        versions = client.list_pipeline_versions(pipeline.pipeline_id, sort_by="created_at desc", page_size=1)
        log.info("uploaded new pipeline %s (%s)", name, pipeline.pipeline_id)
        return pipeline.pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    version = client.upload_pipeline_version(
        package, pipeline_version_name=version_name, pipeline_id=pipeline_id
    )
    log.info("uploaded version %s of pipeline %s", version_name, name)
    return pipeline_id, version.pipeline_version_id
