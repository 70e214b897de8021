"""argparse helpers and the embedded default (sqlite + local artifacts, no server)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from tests.conftest import tiny_config
from tests.mlops.conftest import free_port

from retinaflow.config import Config
from retinaflow.data.validate import fingerprint
from retinaflow.engine.train import train
from retinaflow.mlops.cli import (
    add_registry_commands,
    add_tracking_args,
    make_callbacks,
    tracked,
    tracking_settings,
)
from retinaflow.mlops.errors import TrackingUnavailable
from retinaflow.mlops.settings import artifact_location, resolve_tracking_uri
from retinaflow.mlops.tracking import MlflowSink, sidecar_for
from retinaflow.mlops.writer import _Record, _spill


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    add_tracking_args(p)
    return p


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="retinaflow")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One project folder for the module: the sqlite store is created (migrated) once."""
    return tmp_path_factory.mktemp("project")


@pytest.fixture()
def embedded(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No tracking server: MLFLOW_TRACKING_URI unset, the project folder in a temp dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("RETINAFLOW_PROJECT_DIR", str(project))
    return project


def test_tracking_flags() -> None:
    p = _train_parser()
    assert tracking_settings(p.parse_args(["m.pth"])) is None
    s = tracking_settings(p.parse_args(["m.pth", "--mlflow", "--experiment", "e1", "--run-name", "r1"]))
    assert s is not None and (s.experiment, s.run_name, s.tracking_uri) == ("e1", "r1", None)
    s = tracking_settings(p.parse_args(["m.pth", "--tracking-uri", "http://h:5000"]))
    assert s is not None and s.tracking_uri == "http://h:5000"  # the URI alone turns tracking on
    with tracked(p.parse_args(["m.pth"]), "export") as run:
        assert run is None


def test_uri_resolution(embedded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri() == f"sqlite:///{embedded / 'mlruns.db'}" and embedded.is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri() == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert artifact_location("sqlite:////x/y.db", "my exp") == "file:///x/mlartifacts/my_exp"
    assert artifact_location("http://tracking:5000", "e") is None
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)
    assert resolve_tracking_uri("https://bob:p%40ss@host:443/mlflow") == "https://host:443/mlflow"
    import os

    assert (
        os.environ["MLFLOW_TRACKING_USERNAME"] == "bob" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    )


def test_make_callbacks_ranks_and_unreachable_server(embedded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _train_parser()
    assert make_callbacks(p.parse_args(["m.pth"]), Config()) == []
    monkeypatch.setenv("RANK", "1")
    assert make_callbacks(p.parse_args(["m.pth", "--mlflow"]), Config()) == []
    monkeypatch.setenv("RANK", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        make_callbacks(p.parse_args(["m.pth", "--tracking-uri", dead]), Config())
    assert time.monotonic() - started < 15


def test_embedded_default_tracks_and_registers_without_a_server(
    embedded: Path, synth_small: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "run" / "m.pth"
    args = _train_parser().parse_args(
        [str(ckpt), "--mlflow", "--experiment", "local", "--mlflow-samples", "0"]
    )
    cfg = tiny_config(synth_small, iters=2)
    callbacks = make_callbacks(args, cfg)
    assert len(callbacks) == 1 and isinstance(callbacks[0], MlflowSink)
    train(cfg, ckpt, callbacks)
    sink = callbacks[0]
    assert sink.report is not None and sink.report.complete
    assert (embedded / "mlruns.db").is_file()
    client = MlflowClient(f"sqlite:///{embedded / 'mlruns.db'}")
    run = client.get_run(sink.run_id)
    assert run.data.params["dataset.fingerprint"] == fingerprint(
        synth_small.train_images, synth_small.train_annotations
    )
    stored = list((embedded / "mlartifacts" / "local").rglob("model/m.pth"))
    assert len(stored) == 1 and stored[0].read_bytes() == ckpt.read_bytes()
    assert sidecar_for(ckpt).is_file()
    # the registry works on the embedded store too
    assert (
        _cli(["registry", "register", "--model", "local-det", "--run-id", sink.run_id, "--map", "0.2"]) == 0
    )
    assert _cli(["registry", "promote", "--model", "local-det"]) == 0
    assert "local-det v1 promoted" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("local-det", "champion").version) == "1"


def test_tracking_sync_sends_spilled_records(embedded: Path, tmp_path: Path, capsys) -> None:
    uri = resolve_tracking_uri()
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sync")).info.run_id
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"w")
    spill = sidecar_for(ckpt).with_name(f"{sidecar_for(ckpt).name}.pending-{run_id}.json")
    now = int(time.time() * 1000)
    records = [
        _Record("data", metrics=[("train/loss", 1.0 / s, now + s, s) for s in (1, 2, 3)]),
        _Record("artifact", path=str(ckpt), artifact_path="model"),
        _Record("status", status="FINISHED"),
    ]
    _spill(records, spill, tmp_path / "scratch")
    assert _cli(["tracking", "sync", str(ckpt)]) == 0
    assert "all 3 record(s) delivered" in capsys.readouterr().out
    assert not spill.exists()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/m.pth"]
    assert _cli(["tracking", "sync", str(ckpt)]) == 0
    assert "nothing to send" in capsys.readouterr().out


def _spill_for(ckpt: Path, run_id: str) -> Path:
    spill = sidecar_for(ckpt).with_name(f"{sidecar_for(ckpt).name}.pending-{run_id}.json")
    now = int(time.time() * 1000)
    records = [
        _Record("data", metrics=[("train/loss", 0.5, now, 1)]),
        _Record("status", status="FINISHED"),
    ]
    _spill(records, spill, ckpt.parent / "scratch")
    return spill


def test_tracking_sync_uses_the_uri_saved_next_to_the_checkpoint(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Without --tracking-uri the records go to the server the run lives on (MODEL.pth.mlflow.json),
    not to a fresh store in the working directory."""
    uri = resolve_tracking_uri()
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sync-saved")).info.run_id
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"w")
    sidecar_for(ckpt).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    spill = _spill_for(ckpt, run_id)
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("RETINAFLOW_PROJECT_DIR", str(elsewhere))
    assert _cli(["tracking", "sync", str(ckpt)]) == 0
    assert "all 2 record(s) delivered" in capsys.readouterr().out
    assert not spill.exists() and not (elsewhere / "mlruns.db").exists()
    assert client.get_run(run_id).info.status == "FINISHED"


def test_tracking_sync_keeps_the_spill_file_when_records_are_not_accepted(
    embedded: Path, tmp_path: Path, capsys
) -> None:
    """A run unknown to the server: nothing is accepted, so the spill file stays, and the message says
    where the records are and how to send them."""
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"w")
    spill = _spill_for(ckpt, "0123456789abcdef0123456789abcdef")
    before = spill.read_text()
    assert _cli(["tracking", "sync", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "does not exist" in out and str(spill) in out
    assert spill.read_text() == before


def test_sqlite_store_in_an_unusable_folder_fails_at_once(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not MLflow's ~100 s of retries and a generic OperationalError: one line, the tracking exit code."""
    from retinaflow.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    uri = f"sqlite:///{blocker / 'runs' / 'mlruns.db'}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="cannot use the MLflow store") as info:
        tracking_settings_connect(uri)
    assert time.monotonic() - started < 5 and str(blocker) in str(info.value)
    assert "\n" not in str(info.value) and info.value.exit_code == 9
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    code = main(["eval", "--annotations", str(gt), "--detections", str(gt), "--tracking-uri", uri])
    assert code == 9


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_sqlite_store_in_a_read_only_folder_fails_at_once(embedded: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(TrackingUnavailable, match="not writable"):
            tracking_settings_connect(f"sqlite:///{folder / 'mlruns.db'}")
    finally:
        folder.chmod(0o755)


def tracking_settings_connect(uri: str) -> None:
    from retinaflow.mlops.runs import connect
    from retinaflow.mlops.settings import TrackingSettings

    connect(TrackingSettings(tracking_uri=uri))
