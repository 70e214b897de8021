"""The MLflow sink on real CPU trainings against a real `mlflow server` whose artifacts go to a real S3
server: what is logged, resume into the same run, and tracking-server outages."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from tests.conftest import tiny_config
from tests.mlops.conftest import ARTIFACT_PREFIX, BUCKET, MlflowServer, TcpProxy, free_port

from retinaflow.data.validate import fingerprint
from retinaflow.engine.callbacks import Callback, TrainState
from retinaflow.engine.evaluate import evaluate_detections
from retinaflow.engine.train import train
from retinaflow.mlops.errors import TrackingUnavailable
from retinaflow.mlops.runs import tracked_command
from retinaflow.mlops.settings import TrackingSettings
from retinaflow.mlops.tracking import MlflowSink, sidecar_for


def _settings(server: MlflowServer, **kw: Any) -> TrackingSettings:
    base = {"tracking_uri": server.uri, "experiment": "tracking-tests", "system_metrics_interval": 0,
            "flush_timeout": 60.0, "probe_interval": 0.2, "probe_timeout": 1.0}  # fmt: skip
    return TrackingSettings(**{**base, **kw})


def _steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


class Timeline(Callback):
    """Records when each step happened and runs ``actions[iteration]`` at that step."""

    def __init__(self, actions: dict[int, Any] | None = None) -> None:
        self.times: dict[int, float] = {}
        self.actions = actions or {}

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.times[state.iteration] = time.monotonic()
        if state.iteration in self.actions:
            self.actions[state.iteration]()


def test_tracked_training_logs_params_metrics_system_metrics_and_artifacts(
    mlflow_env: MlflowServer, synth_small: Any, s3_admin: Any, tmp_path: Path
) -> None:
    cfg = tiny_config(synth_small, iters=4)
    cfg.data.val_images, cfg.data.val_annotations = (
        str(synth_small.val_images),
        str(synth_small.val_annotations),
    )
    cfg.train.val_every = 2
    cfg.infer.score_thresh = 0.001  # an untrained head still yields detections, hence PR curves
    ckpt = tmp_path / "model.pth"
    extra = tmp_path / "notes.json"
    extra.write_text('{"note": 1}')
    fp = fingerprint(synth_small.train_images, synth_small.train_annotations)
    sink = MlflowSink(
        _settings(mlflow_env, run_name="tiny", system_metrics_interval=0.3),
        checkpoint=ckpt,
        dataset_fingerprint=fp,
        artifacts=[(extra, "reports")],
        sample_images=2,
    )
    train(cfg, ckpt, [sink])

    assert sink.report is not None and sink.report.complete, sink.report
    client = MlflowClient(mlflow_env.uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    p = run.data.params
    assert p["train.lr"] == str(cfg.train.lr) and p["model.backbone"] == cfg.model.backbone
    assert (
        p["dataset.fingerprint"] == fp
        and p["git.commit"]
        and p["version.torch"]
        and p["device"].startswith("cpu")
    )
    assert p["class_names"] == ",".join(cfg.class_names)
    assert _steps(client, sink.run_id) == [1, 2, 3, 4]
    assert {"train/cls", "train/box", "train/lr", "train/img_s", "val/AP", "val/AR100", "final/mAP"} <= set(
        run.data.metrics
    )
    assert _steps(client, sink.run_id, "val/AP") == [2, 4]
    assert any(k.startswith("val/AP_class/") for k in run.data.metrics)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)  # mlflow's own monitor
    arts = _artifacts(client, sink.run_id)
    assert {"model/model.pth", "config.yaml", "reports/notes.json", "plots/samples.png"} <= arts
    assert {"eval/iter_0000002/pr_curves.png", "eval/iter_0000002/report.json"} <= arts
    # the artifacts really are in the bucket, proxied by the tracking server
    exp = client.get_experiment(run.info.experiment_id)
    prefix = f"{ARTIFACT_PREFIX}/{exp.experiment_id}/{sink.run_id}/artifacts/"
    objects = {
        o["Key"][len(prefix) :]: o["Size"]
        for o in s3_admin.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    }
    assert objects["model/model.pth"] == ckpt.stat().st_size
    assert "plots/samples.png" in objects
    assert json.loads(sidecar_for(ckpt).read_text())["run_id"] == sink.run_id


def test_resume_continues_the_same_run(mlflow_env: MlflowServer, synth_small: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pth"
    first = MlflowSink(_settings(mlflow_env), checkpoint=ckpt, sample_images=0)
    train(tiny_config(synth_small, iters=2), ckpt, [first])
    second = MlflowSink(_settings(mlflow_env), checkpoint=ckpt, sample_images=0)
    train(tiny_config(synth_small, iters=4), ckpt, [second])
    assert second.run_id == first.run_id
    client = MlflowClient(mlflow_env.uri)
    run = client.get_run(first.run_id)
    assert _steps(client, first.run_id) == [1, 2, 3, 4]
    assert run.data.tags["retinaflow.resumes"] == "1" and run.info.status == "FINISHED"
    assert run.data.tags["retinaflow.resume_changed.iter_2"] == "train.iters,train.milestones"
    assert len(client.search_runs([run.info.experiment_id], f"tags.`retinaflow.checkpoint` = '{ckpt}'")) == 1


def test_unreachable_server_at_start_is_one_clear_error(
    mlflow_env: MlflowServer, synth_small: Any, tmp_path: Path
) -> None:
    dead = TrackingSettings(tracking_uri=f"http://127.0.0.1:{free_port()}", probe_timeout=1.0)
    sink = MlflowSink(dead, checkpoint=tmp_path / "m.pth")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        train(tiny_config(synth_small, iters=2), tmp_path / "m.pth", [sink])
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "unreachable" in message and "\n" not in message and "127.0.0.1" in message
    assert not (tmp_path / "m.pth").exists()  # nothing trained without the requested tracking


class TimedSink(MlflowSink):
    """The MLflow sink, timing how long each ``on_step`` keeps the training loop."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.step_seconds: list[float] = []

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        started = time.monotonic()
        super().on_step(state, metrics)
        self.step_seconds.append(time.monotonic() - started)


def test_server_killed_mid_training_buffers_then_flushes(
    mlflow_env: MlflowServer, synth_small: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reached_6, restarted = threading.Event(), threading.Event()

    def restart_later() -> None:
        reached_6.wait(60)
        mlflow_env.restart()
        restarted.set()

    def outage() -> None:
        mlflow_env.stop()
        threading.Thread(target=restart_later, daemon=True).start()

    cfg = tiny_config(synth_small, iters=8)
    ckpt = tmp_path / "m.pth"
    sink = TimedSink(_settings(mlflow_env, system_metrics_interval=0.5), checkpoint=ckpt, sample_images=0)
    with caplog.at_level(logging.WARNING, logger="retinaflow.mlops"):
        train(cfg, ckpt, [sink, Timeline({3: outage, 6: reached_6.set})])
    # iterations 4-6 ran with the server down; the sink never held the loop up
    assert max(sink.step_seconds) < 0.5
    assert restarted.is_set()  # the end of training waited for the server, then everything was flushed
    assert ckpt.is_file()
    assert sink.report is not None and sink.report.complete and sink.report.outages == 1
    client = MlflowClient(mlflow_env.uri)
    assert _steps(client, sink.run_id) == list(range(1, 9))
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["retinaflow.tracking_outages"] == "1"
    assert "model/m.pth" in _artifacts(client, sink.run_id, "model")
    assert "unreachable" in caplog.text and "reachable again" in caplog.text


def test_server_down_at_the_end_spills_and_the_resume_sends_it(
    proxied_mlflow: TcpProxy, synth_small: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "m.pth"
    settings = TrackingSettings(
        tracking_uri=proxied_mlflow.uri,
        experiment="tracking-tests",
        probe_interval=0.2,
        system_metrics_interval=0,
    )
    sink = MlflowSink(replace(settings, flush_timeout=1.0), checkpoint=ckpt, sample_images=0)
    with caplog.at_level(logging.WARNING, logger="retinaflow.mlops"):
        train(tiny_config(synth_small, iters=4), ckpt, [sink, Timeline({2: proxied_mlflow.cut})])
    report = sink.report
    assert report is not None and not report.complete and report.pending_metrics > 0
    assert report.pending_artifacts >= 1  # the final checkpoint
    assert report.spilled_to is not None and report.spilled_to.is_file() and ckpt.is_file()
    assert (
        report.down_at_close
        and f"not sent (the server is unreachable), saved to {report.spilled_to}" in caplog.text
    )
    proxied_mlflow.restore()
    resumed = MlflowSink(settings, checkpoint=ckpt, sample_images=0)
    train(tiny_config(synth_small, iters=6), ckpt, [resumed])
    assert resumed.run_id == sink.run_id and resumed.report is not None and resumed.report.complete
    assert not report.spilled_to.exists()
    client = MlflowClient(proxied_mlflow.uri)
    assert _steps(client, sink.run_id) == list(range(1, 7))
    assert "model/m.pth" in _artifacts(client, sink.run_id, "model")
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def test_tracked_eval_command_logs_report_and_plots(mlflow_env: MlflowServer, synth_small: Any) -> None:
    gt = json.loads(synth_small.val_annotations.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]  # fmt: skip
    result = evaluate_detections(synth_small.val_annotations, dets)
    with tracked_command(_settings(mlflow_env), "eval", {"detections": "perfect"}) as run:
        run.log_eval(
            result, synth_small.val_annotations, None, synth_small.val_images
        )  # no grid without dets
        det_file = _write(dets, synth_small.val_images.parent / "d.json")
        run.log_eval(result, synth_small.val_annotations, det_file, synth_small.val_images, samples=2)
    client = MlflowClient(mlflow_env.uri)
    r = client.get_run(run.run_id)
    assert r.data.metrics["eval/AP"] == pytest.approx(1.0) and r.data.params["detections"] == "perfect"
    assert r.data.tags["retinaflow.kind"] == "eval" and r.info.status == "FINISHED"
    assert {"eval/report.json", "plots/pr_curves.png", "plots/samples.png"} <= _artifacts(client, run.run_id)


def _write(data: Any, path: Path) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_no_secret_in_params_tags_logs_or_output(
    mlflow_env: MlflowServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from retinaflow.config import Config
    from retinaflow.mlops.redact import install_log_redaction

    password, other_password, aws_secret, signature = (
        "Pw-9f8e7d6c",
        "Pw2-abcdef12",
        "AwsSecret-0a1b2c3d4e",
        "Sig0123abcd",
    )
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)  # absent now, restored at teardown
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    install_log_redaction()
    uri = f"http://alice:{password}@127.0.0.1:{mlflow_env.port}"
    cfg = Config()
    cfg.data.images = f"https://data.example/images?X-Amz-Signature={signature}"
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"weights")
    sink = MlflowSink(
        TrackingSettings(tracking_uri=uri, experiment="secrets", system_metrics_interval=0),
        checkpoint=ckpt,
        extra_params={
            "aws_secret_access_key": aws_secret,
            "note": f"via http://bob:{other_password}@minio:9000",
        },
        sample_images=0,
    )
    state = TrainState(config=cfg, output=tmp_path, total_iters=1)
    with caplog.at_level(logging.DEBUG):
        sink.on_train_start(state)
        state.iteration = 1
        sink.on_step(state, {"loss": 1.0})
        sink.on_error(state, RuntimeError(f"boom at http://alice:{password}@host and {aws_secret}"))
        with pytest.raises(TrackingUnavailable) as err:
            MlflowSink(
                TrackingSettings(tracking_uri=f"http://alice:{password}@127.0.0.1:{free_port()}")
            ).check()
    assert sink.report is not None and sink.report.complete
    run = MlflowClient(mlflow_env.uri).get_run(sink.run_id)
    assert run.data.params["aws_secret_access_key"] == "***"
    assert run.data.tags["retinaflow.error"].startswith("RuntimeError: boom at http://***@host")
    out, errout = capfd.readouterr()
    texts = {
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
        "logs": caplog.text,
        "stdout": out,
        "stderr": errout,
        "sidecar": sidecar_for(ckpt).read_text(),
        "error": str(err.value),
    }
    for where, text in texts.items():
        for secret in (password, other_password, aws_secret, signature):
            assert secret not in text, f"{secret} leaked into {where}"
    assert "MLflow run" in caplog.text  # the logs were captured (the check is not vacuous)
