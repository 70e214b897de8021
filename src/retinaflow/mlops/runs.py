"""Opening MLflow runs: experiments, the run-id sidecar next to a checkpoint, replay of spilled records,
and :func:`tracked_command` for one-shot commands (``infer``, ``eval``, ``export``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from retinaflow.engine.callbacks import EvalResult
from retinaflow.mlops.errors import TrackingUnavailable
from retinaflow.mlops.redact import one_line, redact
from retinaflow.mlops.settings import (
    TrackingSettings,
    artifact_location,
    device_description,
    git_commit,
    library_versions,
    probe,
    sqlite_problem,
)
from retinaflow.mlops.writer import (
    RunWriter,
    WriterReport,
    load_spilled,
    requeue,
    save_spilled,
    spilled_uri,
)

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def connect(settings: TrackingSettings) -> tuple[MlflowClient, str]:
    """A client on the resolved tracking URI; a down server or an unwritable sqlite store raises
    :class:`TrackingUnavailable` at once."""
    uri = settings.resolved_uri()
    problem = sqlite_problem(uri)
    if problem:
        raise TrackingUnavailable(
            f"cannot use the MLflow store {redact(uri)}: {problem}; choose another --tracking-uri / "
            "MLFLOW_TRACKING_URI (or RETINAFLOW_PROJECT_DIR for the embedded store)"
        )
    reason = probe(uri, settings.probe_timeout)
    if reason:
        raise TrackingUnavailable(
            f"MLflow tracking server {redact(uri)} is unreachable ({reason}); start it or fix "
            "MLFLOW_TRACKING_URI / --tracking-uri"
        )
    return MlflowClient(uri, registry_uri=uri), uri


def unavailable(uri: str, what: str, exc: BaseException) -> TrackingUnavailable:
    return TrackingUnavailable(f"cannot {what} on MLflow {redact(uri)}: {one_line(exc)}")


def ensure_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """Id of experiment ``name``, created (artifacts in the project folder for sqlite) or restored."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location(uri, name)))
        except MlflowException as exc:  # created concurrently by another process
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            assert exp is not None
    if exp.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    return str(exp.experiment_id)


def run_context(extra: dict[str, Any] | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    """Params describing where a run happened: git commit, library versions, device, dataset fingerprint."""
    ctx: dict[str, Any] = {"git.commit": git_commit() or "unknown", "device": device_description(extra)}
    ctx.update({f"version.{k}": v for k, v in library_versions().items()})
    ctx["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if fingerprint:
        ctx["dataset.fingerprint"] = fingerprint
    return ctx


def clip_params(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        out[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return out


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_-. :/``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


def eval_metrics(result: EvalResult, prefix: str) -> dict[str, float]:
    """The 12 COCO stats and per-class AP as metrics (NaN per-class APs, i.e. no ground truth, skipped)."""
    out = {f"{prefix}/{k}": float(v) for k, v in result.stats.items()}
    for name, ap in result.per_class.items():
        if ap == ap:
            out[f"{prefix}/AP_class/{metric_key(name)}"] = float(ap)
    return out


# -- the sidecar: run id next to the checkpoint, so that a resume continues the same run --------------
def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") else None


def write_sidecar(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**data, "updated": time.time()}, indent=2))
    tmp.replace(path)


def spill_path(sidecar: Path, run_id: str) -> Path:
    return sidecar.with_name(f"{sidecar.name}.pending-{run_id}.json")


def pending_files(sidecar: Path) -> list[Path]:
    """Spill files of ``sidecar`` (all of them when ``sidecar`` is a folder)."""
    if sidecar.is_dir():
        return sorted(sidecar.glob("*.pending-*.json"))
    return sorted(sidecar.parent.glob(f"{sidecar.name}.pending-*.json"))


def replay_pending(
    client: MlflowClient, uri: str, settings: TrackingSettings, sidecar: Path
) -> list[WriterReport]:
    """Send the records spilled next to ``sidecar`` (by an earlier run that ended during an outage) to
    their runs on ``uri`` (see :func:`replay_file`). Returns one report per file."""
    return [replay_file(client, uri, settings, path) for path in pending_files(sidecar)]


def saved_uri(spill: Path) -> str | None:
    """The tracking URI the run of a spill file lives on: the one written in the file, else the one in
    the sidecar it belongs to (``MODEL.pth.mlflow.json`` for ``MODEL.pth.mlflow.json.pending-*.json``)."""
    uri = spilled_uri(spill)
    if uri:
        return uri
    info = read_sidecar(spill.with_name(spill.name.rsplit(".pending-", 1)[0]))
    return str(info["tracking_uri"]) if info and info.get("tracking_uri") else None


def replay_file(client: MlflowClient, uri: str, settings: TrackingSettings, path: Path) -> WriterReport:
    """Send one spill file's records to their run. The file (and its ``.files`` folder) is removed only
    once every record in it was accepted; otherwise it is rewritten with the records that were not
    (rejected, or still undelivered because the server went down again), and ``kept_in`` names it."""
    run_id = path.name.rsplit(".pending-", 1)[1][: -len(".json")]
    records = load_spilled(path)
    if not _run_exists(client, run_id):
        reason = f"run {run_id} does not exist on {redact(uri)}"
        return WriterReport(run_id, lost=[f"{r.describe()}: {reason}" for r in records], kept_in=path)
    writer = RunWriter(client, run_id, uri, settings)
    requeue(writer, records)
    retry = path.with_name(path.name + ".retry")
    report = writer.close(spill=retry)
    left = writer.rejected + load_spilled(retry)
    retry.unlink(missing_ok=True)
    if left:  # in their original order: every rejected record was queued before the undelivered ones
        report.spilled_to = report.kept_in = save_spilled(left, path, redact(uri))
    else:
        path.unlink()
        shutil.rmtree(path.with_name(path.name + ".files"), ignore_errors=True)
    log.info("replayed %d spilled MLflow record(s) into run %s", report.delivered, run_id)
    return report


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def describe(report: WriterReport, uri: str) -> str:
    """One line about what reached MLflow, for the end of a run."""
    if report.complete:
        return f"MLflow run {report.run_id} on {redact(uri)}: all {report.delivered} record(s) delivered"
    parts = [f"MLflow run {report.run_id} on {redact(uri)}: {report.delivered} record(s) delivered"]
    if report.pending:
        where = f"saved to {report.spilled_to}" if report.spilled_to else "LOST (no spill file)"
        why = "the server is unreachable" if report.down_at_close else "the flush timeout ran out"
        parts.append(
            f"{report.pending} record(s) ({report.pending_metrics} metric points, {report.pending_artifacts} "
            f"artifact(s)) not sent ({why}), {where}; they are sent on resume or by "
            "`retinaflow tracking sync`"
        )
    if report.dropped:
        parts.append(
            f"{report.dropped} metric record(s) ({report.dropped_metrics} metric points) dropped and lost: "
            "the in-memory buffer was full (TrackingSettings.max_buffered_records)"
        )
    if report.lost and report.kept_in:
        parts.append(
            f"{len(report.lost)} record(s) not accepted ({report.lost[0]}), kept in {report.kept_in}; send "
            "them with `retinaflow tracking sync` (with --tracking-uri if the run lives on another server)"
        )
    elif report.lost:
        parts.append(f"{len(report.lost)} record(s) rejected by the server and lost, e.g. {report.lost[0]}")
    return "; ".join(parts)


class TrackedRun:
    """A run opened by :func:`tracked_command`: buffered logging through a :class:`RunWriter`."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer
        self.run_id = writer.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.log_params(clip_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.writer.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.writer.log_artifact(path, artifact_path)

    def log_eval(
        self,
        result: EvalResult,
        annotations: str | Path | None = None,
        detections: str | Path | None = None,
        images: str | Path | None = None,
        samples: int = 8,
    ) -> None:
        """Metrics, the JSON report, the precision-recall plot and (given images, annotations and
        detections) a grid of ``samples`` images with predicted and true boxes."""
        from retinaflow.mlops import plots

        self.log_metrics(eval_metrics(result, "eval"))
        report = self.writer.scratch / "eval" / "report.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        stats = {
            "stats": result.stats,
            "per_class_ap": {k: (v if v == v else None) for k, v in result.per_class.items()},
        }
        report.write_text(json.dumps(stats, indent=2))
        self.log_artifact(report, "eval")
        if result.precision is not None:
            fig = plots.pr_curves(result.precision, list(result.per_class))
            self.log_artifact(
                plots.save_figure(fig, self.writer.scratch / "plots" / "pr_curves.png"), "plots"
            )
        if samples > 0 and images and annotations and detections:
            chosen = plots.samples_from_coco(images, annotations, detections, count=samples)
            grid = plots.save_figure(
                plots.detection_grid(chosen), self.writer.scratch / "plots" / "samples.png"
            )
            self.log_artifact(grid, "plots")


@contextmanager
def tracked_command(
    settings: TrackingSettings, kind: str, params: dict[str, Any] | None = None, spill_dir: Path | None = None
) -> Iterator[TrackedRun]:
    """Track one command (``infer``, ``eval``, ``export``...) as an MLflow run.

    A server down at the start raises :class:`TrackingUnavailable`; one that goes down during the
    command is waited for ``settings.flush_timeout`` seconds at the end, then what is left is spilled to
    ``spill_dir`` (default: the working directory) and reported. The run ends FINISHED, or FAILED when
    the body raises.
    """
    client, uri = connect(settings)
    try:
        exp_id = ensure_experiment(client, uri, settings.experiment)
        tags = {"retinaflow.kind": kind, "mlflow.source.git.commit": git_commit() or "unknown"}
        run = client.create_run(exp_id, run_name=settings.run_name, tags=tags)
    except MlflowException as exc:
        raise unavailable(uri, "start a run", exc) from exc
    writer = RunWriter(client, run.info.run_id, uri, settings)
    tracked = TrackedRun(writer)
    tracked.log_params({**run_context(), **(params or {})})
    status = "FINISHED"
    try:
        yield tracked
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        writer.set_tags({"retinaflow.error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
        raise
    finally:
        writer.set_status(status)
        spill = (spill_dir or Path.cwd()) / f"mlflow-{kind}.pending-{run.info.run_id}.json"
        report = writer.close(spill=spill)
        (log.info if report.complete else log.warning)("%s", describe(report, uri))
