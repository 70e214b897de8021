"""Buffered writes to one MLflow run that survive tracking-server outages (:class:`RunWriter`), and their
spill files (:func:`load_spilled`, :func:`save_spilled`) for records still undelivered at the end.

Why not MLflow's own asynchronous logging (``mlflow.config.enable_async_logging``,
``log_batch(..., synchronous=False)``): it does the non-blocking part, but a batch whose request fails
after the HTTP client's retries is dropped (only logged, and the exception set on its future); batches
go out from a thread pool (``MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE``, 10), so not necessarily in order;
its queue is unbounded; artifacts and the run status are not covered; and nothing outlives the process.
What is kept here is what it lacks: waiting out an outage with everything queued in order, a cap that
drops only metric points, and spilling to disk with a replay on resume.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from retinaflow.mlops.redact import one_line, redact, redact_mapping
from retinaflow.mlops.settings import TrackingSettings, probe

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


@dataclass
class _Record:
    kind: str  # "data" (metrics/params/tags), "artifact" or "status"
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ms, step
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    path: str = ""
    artifact_path: str | None = None
    status: str = ""

    @property
    def metrics_only(self) -> bool:
        """Metric points and nothing else: such records merge into one request and may be dropped."""
        return self.kind == "data" and not self.params and not self.tags

    def describe(self) -> str:
        if self.kind == "artifact":
            return f"artifact {Path(self.path).name}"
        if self.kind == "status":
            return f"run status {self.status}"
        return f"{len(self.metrics)} metric points, {len(self.params)} params, {len(self.tags)} tags"


@dataclass
class WriterReport:
    """What happened to everything handed to a :class:`RunWriter`."""

    run_id: str
    delivered: int = 0  # records sent
    lost: list[str] = field(default_factory=list)  # records the server rejected, with reasons
    dropped: int = 0  # metric records dropped because the buffer was full (settings.max_buffered_records)
    dropped_metrics: int = 0  # metric points in them
    pending: int = 0  # records not delivered at close (spilled when a spill file was given)
    pending_metrics: int = 0
    pending_artifacts: int = 0
    outages: int = 0
    down_at_close: bool = False  # pending because the server was unreachable (else: the flush timed out)
    spilled_to: Path | None = None
    kept_in: Path | None = None  # replay only: the spill file still holding the records not accepted

    @property
    def complete(self) -> bool:
        return not self.lost and not self.pending and not self.dropped


class RunWriter:
    """Ordered background writer for one run; producers never block and may call from any thread.

    Every metric, param, tag, artifact and the final status go into one in-memory queue that one
    thread sends in order (consecutive metric records merged into one request). Before each send the
    thread probes the server (:func:`retinaflow.mlops.settings.probe`); while it is down records stay
    queued (the outage logged once, with the count waiting) and go out, with their original timestamps,
    when it answers again. A record the server *rejects* while reachable is counted as lost, with why.
    Beyond ``settings.max_buffered_records`` the oldest metric records are dropped (counted in
    :attr:`WriterReport.dropped`); params, tags, artifacts and statuses never are. Nothing is lost
    silently: every record is delivered, spilled by :meth:`close`, or reported lost or dropped.
    """

    def __init__(self, client: MlflowClient, run_id: str, uri: str, settings: TrackingSettings) -> None:
        self.client, self.run_id, self.uri, self.settings = client, run_id, uri, settings
        self.scratch = Path(tempfile.mkdtemp(prefix="retinaflow-mlflow-"))
        self._queue: deque[_Record] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._sending = 0  # records at the head of the queue in a request right now: never dropped
        self._closing = False
        self._stop = threading.Event()
        self._down_since: float | None = None
        self.report = WriterReport(run_id)
        self.rejected: list[_Record] = []  # the records behind report.lost, for a replay to keep
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-writer-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- producers -----------------------------------------------------------------------------
    def _put(self, record: _Record) -> None:
        with self._cond:
            if self._closing:
                self.report.lost.append(f"{record.describe()}: handed to the writer after it was closed")
                return
            self._queue.append(record)
            if len(self._queue) > self.settings.max_buffered_records:
                self._drop_oldest_metrics()
            self._cond.notify_all()

    def _drop_oldest_metrics(self) -> None:
        """Make room for one record: drop the oldest metric-only record not being sent (with the lock
        held). When there is none (only params, tags, artifacts, statuses) the buffer goes over the cap."""
        oldest = next((i for i, r in enumerate(self._queue) if i >= self._sending and r.metrics_only), None)
        if oldest is None:
            return
        rec = self._queue[oldest]
        del self._queue[oldest]
        if not self.report.dropped:
            log.warning(
                "MLflow buffer full (%d records): dropping the oldest metric records until the tracking "
                "server answers (raise TrackingSettings.max_buffered_records to keep more)",
                self.settings.max_buffered_records,
            )
        self.report.dropped += 1
        self.report.dropped_metrics += len(rec.metrics)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._put(_Record("data", metrics=[(k, float(v), now, int(step)) for k, v in metrics.items()]))

    def log_params(self, params: dict[str, Any]) -> None:
        if params:
            self._put(_Record("data", params=redact_mapping(params)))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            self._put(_Record("data", tags=redact_mapping(tags)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put(_Record("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path))

    def set_status(self, status: str) -> None:
        self._put(_Record("status", status=status))

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue) + int(self._busy)

    # -- the sending thread --------------------------------------------------------------------
    def _take(self) -> list[_Record]:
        """Head of the queue, merging consecutive metric-only records into one request (at most
        MLflow's ``MAX_METRICS_PER_BATCH`` points, so that ``log_batch`` does not split it into several
        requests, some of which could land before a failure and be sent again)."""
        head = self._queue[0]
        if not head.metrics_only:
            return [head]
        batch, count = [], 0
        for rec in self._queue:
            if not rec.metrics_only or count + len(rec.metrics) > MAX_METRICS_PER_BATCH:
                break
            batch.append(rec)
            count += len(rec.metrics)
        return batch or [head]

    def _send(self, batch: list[_Record]) -> None:
        head = batch[0]
        if head.kind == "artifact":
            self.client.log_artifact(self.run_id, head.path, head.artifact_path)
        elif head.kind == "status":
            self.client.set_terminated(self.run_id, head.status)
        else:
            metrics = [Metric(k, v, ms, step) for rec in batch for (k, v, ms, step) in rec.metrics]
            params = [Param(k, v) for k, v in head.params.items()]
            tags = [RunTag(k, v) for k, v in head.tags.items()]
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)

    def _mark_down(self, reason: str) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            self.report.outages += 1
            log.warning(
                "MLflow tracking server %s unreachable (%s): training continues, %d record(s) are buffered "
                "and will be sent when it answers again",
                redact(self.uri),
                reason,
                self.queued,
            )

    def _mark_up(self) -> None:
        if self._down_since is not None:
            seconds = time.time() - self._down_since
            self._down_since = None
            log.warning(
                "MLflow tracking server reachable again after %.0f s; sending %d buffered record(s)",
                seconds,
                self.queued,
            )

    def _wait_down(self, reason: str) -> None:
        self._mark_down(reason)
        self._stop.wait(self.settings.probe_interval)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                self._busy = True
            try:
                self._send_head()
            finally:
                with self._cond:
                    self._busy = False
                    self._sending = 0
                    self._cond.notify_all()

    def _send_head(self) -> None:
        """Probe, then send the head of the queue; while the server is down, wait and leave it queued."""
        reason = probe(self.uri, self.settings.probe_timeout)
        if reason:
            self._wait_down(reason)
            return
        self._mark_up()
        with self._cond:
            if not self._queue:  # close() emptied it meanwhile
                return
            batch = self._take()
            self._sending = len(batch)
        try:
            self._send(batch)
        except Exception as exc:
            reason = probe(self.uri, self.settings.probe_timeout)
            if reason:  # went down during the request: keep the records, retry later
                self._wait_down(reason)
                return
            message = one_line(exc)
            self.rejected.extend(batch)
            self.report.lost.extend(f"{rec.describe()}: {message}" for rec in batch)
            log.warning("MLflow rejected %s of run %s: %s", batch[0].describe(), self.run_id, message)
        else:
            self.report.delivered += len(batch)
        with self._cond:
            for rec in batch:  # close() may have emptied the queue meanwhile
                if self._queue and self._queue[0] is rec:
                    self._queue.popleft()
            self._cond.notify_all()

    # -- draining ------------------------------------------------------------------------------
    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is sent (or rejected); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout: float | None = None, spill: Path | None = None) -> WriterReport:
        """Drain for up to ``timeout`` (default ``settings.flush_timeout``) seconds, then stop; records
        still queued are written to ``spill`` (JSON, naming the tracking URI, with the writer's scratch
        files such as plots moved next to it) when given. Returns the :class:`WriterReport`."""
        drained = self.flush(self.settings.flush_timeout if timeout is None else timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if not drained:
            self._stop.set()
        self._thread.join(timeout=5.0 if drained else 1.0)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        r = self.report
        r.pending = len(left)
        r.pending_metrics = sum(len(x.metrics) for x in left)
        r.pending_artifacts = sum(x.kind == "artifact" for x in left)
        r.down_at_close = self.down
        if left and spill is not None:
            r.spilled_to = _spill(left, spill, self.scratch, redact(self.uri))
        shutil.rmtree(self.scratch, ignore_errors=True)
        return r


def _spill(records: list[_Record], path: Path, scratch: Path | None, uri: str | None = None) -> Path:
    """Append ``records`` as JSON to ``path`` (with ``uri``, the tracking URI their run lives on);
    artifacts living in ``scratch`` are moved next to it."""
    keep_dir = path.with_name(path.name + ".files")
    out = []
    for rec in records:
        item = {k: v for k, v in rec.__dict__.items() if v not in ("", None, [], {})}
        if rec.kind == "artifact" and scratch is not None and Path(rec.path).is_relative_to(scratch):
            target = keep_dir / Path(rec.path).relative_to(scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(rec.path, target)
            item["path"] = str(target)
        out.append(item)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    existing = previous.get("records", [])
    uri = uri or previous.get("tracking_uri")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"records": existing + out, **({"tracking_uri": uri} if uri else {})}))
    tmp.replace(path)
    return path


def load_spilled(path: Path) -> list[_Record]:
    """Records spilled by :meth:`RunWriter.close` (empty when the file is absent)."""
    if not path.is_file():
        return []
    raw = json.loads(path.read_text()).get("records", [])
    return [_Record(**{**r, "metrics": [tuple(m) for m in r.get("metrics", [])]}) for r in raw]


def save_spilled(records: list[_Record], path: Path, uri: str | None) -> Path:
    """Replace the spill file ``path`` with exactly ``records`` (what a replay could not deliver)."""
    fresh = path.with_name(path.name + ".new")
    fresh.unlink(missing_ok=True)
    return _spill(records, fresh, None, uri).replace(path)


def spilled_uri(path: Path) -> str | None:
    """The tracking URI a spill file names (None for files written before it was recorded)."""
    try:
        uri = json.loads(path.read_text()).get("tracking_uri")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return str(uri) if uri else None


def requeue(writer: RunWriter, records: list[_Record]) -> None:
    """Queue spilled records again (in their original order, with their original timestamps)."""
    for rec in records:
        writer._put(rec)


class SystemMetricsSampler(SystemMetricsMonitor):
    """MLflow's own system-metrics monitor (CPU/RAM/disk/network via psutil, GPU via nvidia-ml-py when
    present), with its samples routed through a :class:`RunWriter` so that they are buffered across
    outages like every other metric (MLflow's stock loop stops for good at the first failed request)."""

    def __init__(self, writer: RunWriter, interval: float, resume: bool) -> None:
        super().__init__(
            writer.run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=writer.uri
        )
        self._writer = writer

    def monitor(self) -> None:
        while not self._shutdown_event.is_set():
            for _ in range(self.samples_before_logging):
                self.collect_metrics()
                if self._shutdown_event.wait(self.sampling_interval):
                    break
            metrics = self.aggregate_metrics()
            if metrics:
                self.publish_metrics(metrics)

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        prefix = self._metrics_prefix + (self.node_id + "/" if self.node_id else "")
        self._writer.log_metrics({prefix + k: v for k, v in metrics.items()}, self._logging_step)
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()

    def finish(self) -> None:
        if self._process is None:
            return
        self._shutdown_event.set()
        self._process.join(timeout=30)
        self._process = None
