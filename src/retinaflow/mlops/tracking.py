"""The MLflow training sink (:class:`MlflowSink`): params, metrics, system metrics, artifacts and plots.

Plugged into ``retinaflow.engine.train.train`` as a callback; it acts on rank 0 only and never makes
training wait for MLflow (its writes go through :class:`retinaflow.mlops.writer.RunWriter`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from retinaflow.engine.callbacks import Callback, EvalResult, TrainState
from retinaflow.mlops.errors import MlopsError, TrackingUnavailable
from retinaflow.mlops.redact import one_line, redact
from retinaflow.mlops.runs import (
    clip_params,
    connect,
    describe,
    ensure_experiment,
    eval_metrics,
    read_sidecar,
    replay_pending,
    run_context,
    spill_path,
    unavailable,
    write_sidecar,
)
from retinaflow.mlops.settings import TrackingSettings, flatten, git_commit
from retinaflow.mlops.writer import RunWriter, SystemMetricsSampler, WriterReport

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def sidecar_for(checkpoint: str | Path) -> Path:
    """Where the run id of the training that writes ``checkpoint`` is kept."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".mlflow.json")


class MlflowSink(Callback):
    """Rank-0 MLflow sink for training.

    - Start: the server is probed first (unreachable: :class:`TrackingUnavailable`, before any training
      work). The run id is kept in a sidecar next to the checkpoint (``MODEL.pth.mlflow.json``); a resumed
      training continues that run, after replaying what an earlier outage spilled.
    - Params: the resolved config flattened (``train.lr``...), dataset fingerprint, git commit, library
      versions, device, all redacted; the config also as ``config.yaml``.
    - Metrics: ``train/<name>`` per ``on_step`` (step = iteration); ``val/<COCO stat>`` and
      ``val/AP_class/<class>`` per validation; ``system/...`` every ``settings.system_metrics_interval`` s.
    - Artifacts: per validation ``eval/iter_NNNNNNN/{report.json,pr_curves.png}``; at the end the checkpoint
      under ``model/``, the ``artifacts`` given, and ``plots/samples.png`` (predicted and true boxes).
    - Outages: the writer buffers; at the end it waits ``settings.flush_timeout`` s, then spills the rest
      next to the checkpoint, sent on the next resume or by ``retinaflow tracking sync MODEL.pth``. The
      outage count is the tag ``retinaflow.tracking_outages``.

    checkpoint: the checkpoint path training writes/resumes (names the sidecar; without it the sidecar
    is ``<output>/mlflow_run.json``). artifacts: extra files logged at the end, as ``(path, folder)``.
    register_as: registered-model name to register the finished run under (alias ``challenger``).
    """

    def __init__(
        self,
        settings: TrackingSettings | None = None,
        checkpoint: str | Path | None = None,
        dataset_fingerprint: str | None = None,
        extra_params: dict[str, Any] | None = None,
        artifacts: list[tuple[str | Path, str]] | None = None,
        sample_images: int = 8,
        register_as: str | None = None,
    ) -> None:
        self.settings = settings or TrackingSettings()
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.fingerprint = dataset_fingerprint
        self.extra_params = dict(extra_params or {})
        self.artifacts = [(Path(p), folder) for p, folder in (artifacts or [])]
        self.sample_images = sample_images
        self.register_as = register_as
        self.run_id: str | None = None
        self.uri: str | None = None
        self.report: WriterReport | None = None
        self.registered_version: str | None = None
        self._writer: RunWriter | None = None
        self._sampler: SystemMetricsSampler | None = None
        self._sidecar: Path | None = None
        self._last_eval: EvalResult | None = None

    # -- set-up --------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`TrackingUnavailable` now if the tracking server does not answer."""
        if is_rank_zero():
            connect(self.settings)

    def _sidecar_path(self, state: TrainState) -> Path:
        return sidecar_for(self.checkpoint) if self.checkpoint else Path(state.output) / "mlflow_run.json"

    def on_train_start(self, state: TrainState) -> None:
        if not is_rank_zero():
            return
        client, uri = connect(self.settings)
        self.uri, self._sidecar = uri, self._sidecar_path(state)
        try:
            replay_pending(client, uri, self.settings, self._sidecar)
            run, continued = self._open_run(client, uri, state)
        except MlopsError:
            raise
        except Exception as exc:
            raise unavailable(uri, "start the training run", exc) from exc
        self.run_id = run.info.run_id
        self._writer = writer = RunWriter(client, self.run_id, uri, self.settings)
        params = {
            **flatten(state.config.to_dict()),
            **run_context(state.extra, self.fingerprint),
            **self.extra_params,
        }
        params = clip_params(params)
        if continued:
            old = run.data.params
            changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
            params = {k: v for k, v in params.items() if k not in old}
            if changed:
                log.warning(
                    "resumed with changed settings (kept the first values in MLflow): %s", ", ".join(changed)
                )
                writer.set_tags(
                    {f"retinaflow.resume_changed.iter_{state.iteration}": ",".join(changed)[:5000]}
                )
        writer.log_params(params)
        config_file = writer.scratch / "config.yaml"
        config_file.write_text(redact(yaml.safe_dump(state.config.to_dict(), sort_keys=False)))
        writer.log_artifact(config_file)
        if continued:
            resumes = int(run.data.tags.get("retinaflow.resumes", "0")) + 1
            writer.set_tags(
                {"retinaflow.resumes": resumes, f"retinaflow.resumed_at.{resumes}": state.iteration}
            )
        self._update_sidecar(state)
        if self.settings.system_metrics_interval > 0:
            try:
                self._sampler = SystemMetricsSampler(writer, self.settings.system_metrics_interval, continued)
                self._sampler.start()
            except Exception as exc:  # psutil missing or an exotic platform: the run goes on without
                log.warning("system metrics disabled: %s", one_line(exc))
        log.info("MLflow run %s on %s (%s)", self.run_id, redact(uri), "continued" if continued else "new")

    def _open_run(self, client: Any, uri: str, state: TrainState) -> tuple[Any, bool]:
        from mlflow.exceptions import MlflowException

        assert self._sidecar is not None
        info = read_sidecar(self._sidecar)
        if info and state.resumed:
            if info.get("tracking_uri") != redact(uri):
                log.warning(
                    "the checkpoint's MLflow run %s lives on another server; starting a new run",
                    info["run_id"],
                )
            else:
                try:
                    run = client.get_run(info["run_id"])
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    run = None
                if run is not None and run.info.lifecycle_stage == "active":
                    client.update_run(run.info.run_id, status="RUNNING")
                    return run, True
                log.warning("MLflow run %s of the checkpoint is gone; starting a new run", info["run_id"])
        exp_id = ensure_experiment(client, uri, self.settings.experiment)
        tags = {
            "retinaflow.kind": "train",
            "mlflow.source.git.commit": git_commit() or "unknown",
            "retinaflow.checkpoint": redact(str(self.checkpoint or state.output)),
        }
        return client.create_run(exp_id, run_name=self.settings.run_name, tags=tags), False

    def _update_sidecar(self, state: TrainState) -> None:
        if self._sidecar is None or self.run_id is None or self.uri is None:
            return
        write_sidecar(
            self._sidecar,
            {
                "run_id": self.run_id,
                "tracking_uri": redact(self.uri),
                "experiment": self.settings.experiment,
                "iteration": state.iteration,
            },
        )

    # -- during training -----------------------------------------------------------------------
    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self._writer is not None:
            self._writer.log_metrics({f"train/{k}": v for k, v in metrics.items()}, state.iteration)

    def on_validation(self, state: TrainState, result: EvalResult) -> None:
        if self._writer is None:
            return
        from retinaflow.mlops import plots

        self._last_eval = result
        writer = self._writer
        writer.log_metrics(eval_metrics(result, "val"), state.iteration)
        folder = f"eval/iter_{state.iteration:07d}"
        out = writer.scratch / folder
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "iteration": state.iteration,
            "stats": result.stats,
            "per_class_ap": {k: (v if v == v else None) for k, v in result.per_class.items()},
            "num_images": result.num_images,
            "num_detections": result.num_detections,
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        writer.log_artifact(out / "report.json", folder)
        if result.precision is not None:
            fig = plots.pr_curves(result.precision, list(result.per_class))
            writer.log_artifact(plots.save_figure(fig, out / "pr_curves.png"), folder)

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        self._update_sidecar(state)

    # -- the end -------------------------------------------------------------------------------
    def on_train_end(self, state: TrainState, path: Path) -> None:
        if self._writer is None:
            return
        writer = self._writer
        writer.log_artifact(path, "model")
        for extra, folder in self.artifacts:
            if extra.exists():
                writer.log_artifact(extra, folder)
            else:
                log.warning("artifact %s does not exist; not logged", extra)
        if self.sample_images > 0 and state.config.data.val_images and state.config.data.val_annotations:
            self._log_samples(state, path)
        if self._last_eval is not None:
            writer.log_metrics({"final/mAP": self._last_eval.map}, state.iteration)
        self._finish(state, "FINISHED")
        if self.register_as and self.report is not None:
            self._register(state, path)

    def on_error(self, state: TrainState, error: BaseException) -> None:
        if self._writer is None:
            return
        interrupted = isinstance(error, KeyboardInterrupt) or type(error).__name__ == "TrainingInterrupted"
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        self._writer.set_tags({"retinaflow.error": f"{type(error).__name__}: {text}"})
        self._finish(state, "KILLED" if interrupted else "FAILED")

    def _finish(self, state: TrainState, status: str) -> None:
        assert self._writer is not None and self.uri is not None and self.run_id is not None
        if self._sampler is not None:
            self._sampler.finish()
        writer = self._writer
        writer.set_tags(
            {
                "retinaflow.final_iteration": state.iteration,
                "retinaflow.tracking_outages": writer.report.outages,
            }
        )
        writer.set_status(status)
        spill = spill_path(self._sidecar, self.run_id) if self._sidecar else None
        self.report = writer.close(spill=spill)
        self._update_sidecar(state)
        (log.info if self.report.complete else log.warning)("%s", describe(self.report, self.uri))
        self._writer = None

    def _log_samples(self, state: TrainState, checkpoint: Path) -> None:
        """Detect on ``sample_images`` validation images with the final checkpoint and log the grid.
        A plot is a courtesy: failing to draw it is logged, never fatal to the training."""
        from retinaflow.engine.infer import infer
        from retinaflow.mlops import plots

        assert self._writer is not None
        data = state.config.data
        try:
            gt = json.loads(Path(str(data.val_annotations)).read_text())
            images = plots.choose_images(gt, self.sample_images)
            ids = {im["id"] for im in images}
            subset = {
                **gt,
                "images": images,
                "annotations": [a for a in gt.get("annotations", []) if a["image_id"] in ids],
            }
            with tempfile.TemporaryDirectory() as tmp:
                ann = Path(tmp) / "samples.json"
                ann.write_text(json.dumps(subset))
                dets = Path(tmp) / "detections.json"
                infer(checkpoint, str(data.val_images), dets, state.config.infer, annotations=ann)
                samples = plots.samples_from_coco(
                    str(data.val_images), subset, dets, count=self.sample_images
                )
            grid = plots.save_figure(
                plots.detection_grid(samples), self._writer.scratch / "plots" / "samples.png"
            )
            self._writer.log_artifact(grid, "plots")
        except Exception as exc:
            log.warning("sample-detection plot skipped: %s", one_line(exc))

    def _register(self, state: TrainState, checkpoint: Path) -> None:
        from retinaflow.mlops.registry import register_model

        assert self.report is not None and self.run_id is not None
        if self.report.pending:
            log.warning(
                "not registering %s: the run's artifacts are not on the server yet; after "
                "`retinaflow tracking sync`, run `retinaflow registry register --model %s --run-id %s`",
                self.register_as,
                self.register_as,
                self.run_id,
            )
            return
        try:
            mv = register_model(
                str(self.register_as),
                run_id=self.run_id,
                settings=self.settings,
                map_value=self._last_eval.map if self._last_eval else None,
            )
        except (MlopsError, TrackingUnavailable) as exc:
            log.warning("registration of run %s failed: %s", self.run_id, exc)
            return
        self.registered_version = mv.version
