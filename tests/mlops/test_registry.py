"""Registration, the promotion gate and concurrent registrations against a real `mlflow server` (sqlite
backend, artifacts proxied to a real S3 server)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from tests.mlops.conftest import ARTIFACT_PREFIX, BUCKET, MlflowServer

from retinaflow.mlops import registry
from retinaflow.mlops.cli import add_registry_commands
from retinaflow.mlops.errors import RegistryError
from retinaflow.mlops.registry import CHALLENGER, CHAMPION, ModelFiles, decide, promote, register_model
from retinaflow.mlops.settings import TrackingSettings


def _name() -> str:
    return f"det-{uuid.uuid4().hex[:8]}"


def _settings(server: MlflowServer) -> TrackingSettings:
    return TrackingSettings(tracking_uri=server.uri, experiment="registry-tests")


def _training_run(server: MlflowServer, tmp_path: Path, backbone: str = "resnet18") -> str:
    """A finished run shaped like a tracked training: params and a model/ checkpoint artifact."""
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("registry-tests")
    exp_id = exp.experiment_id if exp else client.create_experiment("registry-tests")
    run_id = client.create_run(exp_id).info.run_id
    for key, value in {
        "model.backbone": backbone,
        "dataset.fingerprint": "fp-1234",
        "git.commit": "abc123",
        "infer.precision": "fp16",
        "export.precision": "fp16",
    }.items():
        client.log_param(run_id, key, value)
    client.log_metric(run_id, "val/AP", 0.25, step=10)
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"checkpoint-" + backbone.encode())
    client.log_artifact(run_id, str(ckpt), "model")
    client.set_terminated(run_id)
    return run_id


def _version(
    name: str, tmp_path: Path, server: MlflowServer, map_value: float, latency: float | None
) -> ModelVersion:
    ckpt = tmp_path / f"{map_value}-{latency}.pth"
    ckpt.write_bytes(os.urandom(64))
    return register_model(name, files=ModelFiles(checkpoint=ckpt), map_value=map_value, latency_ms=latency,
                    settings=_settings(server))  # fmt: skip


def test_register_a_training_run(mlflow_env: MlflowServer, tmp_path: Path, s3_admin: Any) -> None:
    name = _name()
    run_id = _training_run(mlflow_env, tmp_path)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx-bytes")
    mv = register_model(name, run_id, ModelFiles(onnx=onnx), latency_ms=12.5, settings=_settings(mlflow_env))
    assert mv.source == f"runs:/{run_id}/model" and mv.run_id == run_id
    assert mv.tags["map"] == "0.25"  # from the run's val/AP
    assert mv.tags["latency_ms"] == "12.5" and mv.tags["backbone"] == "resnet18"
    assert mv.tags["dataset_fingerprint"] == "fp-1234" and mv.tags["git_commit"] == "abc123"
    assert mv.tags["precision"] == "fp16" and mv.tags["files"] == "model.onnx,model.pth"
    client = MlflowClient(mlflow_env.uri)
    assert client.get_model_version_by_alias(name, CHALLENGER).version == mv.version
    fetched = registry.fetch(name, CHALLENGER, tmp_path / "fetched", _settings(mlflow_env))
    assert (fetched / "model.pth").read_bytes() == b"checkpoint-resnet18"
    assert (fetched / "model.onnx").read_bytes() == b"onnx-bytes"
    exp_id = client.get_run(run_id).info.experiment_id
    key = f"{ARTIFACT_PREFIX}/{exp_id}/{run_id}/artifacts/model/model.onnx"
    assert s3_admin.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"onnx-bytes"


def test_a_tensorrt_engine_is_registered_with_its_metadata(mlflow_env: MlflowServer, tmp_path: Path) -> None:
    name = _name()
    ckpt, plan = tmp_path / "model.pth", tmp_path / "model.plan"
    ckpt.write_bytes(b"checkpoint")
    plan.write_bytes(b"plan-bytes")
    (tmp_path / "model.plan.json").write_text('{"class_names": ["a"]}')
    mv = register_model(name, files=ModelFiles(checkpoint=ckpt, engine=plan), settings=_settings(mlflow_env))
    assert mv.tags["files"] == "model.plan,model.plan.json,model.pth"
    fetched = registry.fetch(name, CHALLENGER, tmp_path / "fetched", _settings(mlflow_env))
    assert (fetched / "model.plan.json").read_text() == '{"class_names": ["a"]}'


def test_register_needs_model_files(mlflow_env: MlflowServer, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_env.uri)
    empty_run = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    with pytest.raises(RegistryError, match="no model/ artifacts"):
        register_model(_name(), empty_run, settings=_settings(mlflow_env))
    with pytest.raises(RegistryError, match="nothing to register"):
        register_model(_name(), settings=_settings(mlflow_env))
    with pytest.raises(RegistryError, match="not found"):
        register_model(
            _name(), files=ModelFiles(checkpoint=tmp_path / "missing.pth"), settings=_settings(mlflow_env)
        )


def test_promotion_gate_accepts_and_refuses(mlflow_env: MlflowServer, tmp_path: Path) -> None:
    name, s = _name(), _settings(mlflow_env)
    client = MlflowClient(mlflow_env.uri)

    _version(name, tmp_path, mlflow_env, 0.40, 10.0)
    first = promote(name, settings=s)
    assert first.promoted and first.champion_before is None and "first model" in first.reasons[0]

    _version(name, tmp_path, mlflow_env, 0.41, 10.5)  # +0.01 mAP, +5% latency
    better = promote(name, settings=s)
    assert better.promoted and better.champion_before == "1" and better.champion_after == "2"

    _version(name, tmp_path, mlflow_env, 0.412, 10.0)  # +0.002 < 0.005
    small = promote(name, settings=s)
    assert not small.promoted and "gain +0.0020 < 0.0050" in small.reasons[0]

    _version(name, tmp_path, mlflow_env, 0.50, 12.0)  # much better but +14% latency
    slow = promote(name, min_gain=0.005, max_latency_regression=0.1, settings=s)
    assert not slow.promoted and "+14.3% > +10.0%" in slow.reasons[1]
    assert promote(name, max_latency_regression=0.2, settings=s).promoted  # a looser bound lets it through

    _version(name, tmp_path, mlflow_env, 0.60, None)  # latency not measured while the champion's is
    blind = promote(name, settings=s)
    assert not blind.promoted and "not measured on the challenger" in blind.reasons[1]

    assert client.get_model_version_by_alias(name, CHAMPION).version == "4"
    assert client.get_model_version_by_alias(name, CHALLENGER).version == "5"
    v3 = client.get_model_version(name, "3")
    assert v3.tags["promotion.decision"] == "refused" and v3.tags["promotion.against"] == "2"
    assert "gain +0.0020" in v3.tags["promotion.reasons"]
    assert client.get_model_version(name, "4").tags["promotion.decision"] == "promoted"
    assert client.get_registered_model(name).tags["promotion.last"].startswith(f"{name} v5 refused")
    rows = registry.list_versions(name, s)
    assert [r.version for r in rows] == ["5", "4", "3", "2", "1"]
    assert rows[0].aliases == [CHALLENGER] and rows[1].aliases == [CHAMPION]
    assert rows[1].map == pytest.approx(0.5) and rows[1].latency_ms == pytest.approx(12.0)


def test_gate_edges_without_a_server() -> None:
    def mv(version: str, **tags: Any) -> ModelVersion:
        tag_list = [ModelVersionTag(k, str(v)) for k, v in tags.items()]
        return ModelVersion(name="m", version=version, creation_timestamp=0, tags=tag_list)

    assert decide(mv("2", map=0.505), mv("1", map=0.5), 0.005, 0.1)[0]  # exactly the margin passes
    assert not decide(mv("2", map=0.5049), mv("1", map=0.5), 0.005, 0.1)[0]
    assert decide(mv("2", map=0.6, latency_ms=11.0), mv("1", map=0.5, latency_ms=10.0), 0.005, 0.1)[0]
    ok, reasons = decide(mv("2", map=0.6), mv("1", map=0.5), 0.005, 0.1)
    assert ok and "latency check skipped" in reasons[1]
    ok, reasons = decide(mv("2"), mv("1", map=0.5), 0.005, 0.1)
    assert not ok and "mAP missing on challenger" in reasons[0]
    ok, reasons = decide(mv("3", map=0.9), mv("3", map=0.9), 0.005, 0.1)
    assert not ok and "already the champion" in reasons[0]


def test_the_first_champion_must_clear_the_map_floor_without_a_server() -> None:
    def mv(**tags: Any) -> ModelVersion:
        tag_list = [ModelVersionTag(k, str(v)) for k, v in tags.items()]
        return ModelVersion(name="m", version="1", creation_timestamp=0, tags=tag_list)

    ok, reasons = decide(mv(map=0.0), None, 0.005, 0.1)  # default floor 0: mAP must be above it
    assert not ok and "mAP 0.0000 <= floor 0.0000 (first_champion_min_map)" in reasons[0]
    assert decide(mv(map=0.001), None, 0.005, 0.1)[0]
    assert not decide(mv(map=0.3), None, 0.005, 0.1, first_champion_min_map=0.3)[0]  # at the floor: no
    assert decide(mv(map=0.3001), None, 0.005, 0.1, first_champion_min_map=0.3)[0]
    ok, reasons = decide(mv(), None, 0.005, 0.1)
    assert not ok and "no mAP" in reasons[0]


def test_first_version_below_the_floor_is_not_champion(
    mlflow_env: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, s = _name(), _settings(mlflow_env)
    client = MlflowClient(mlflow_env.uri)
    _version(name, tmp_path, mlflow_env, 0.0, 10.0)  # e.g. a training that learnt nothing
    zero = promote(name, settings=s)
    assert not zero.promoted and zero.champion_after is None
    assert client.get_registered_model(name).aliases == {CHALLENGER: "1"}
    _version(name, tmp_path, mlflow_env, 0.3, 10.0)
    refused = promote(name, first_champion_min_map=0.35, settings=s)
    assert not refused.promoted and "mAP 0.3000 <= floor 0.3500" in refused.reasons[0]
    assert client.get_model_version(name, "2").tags["promotion.first_champion_min_map"] == "0.35"
    capsys.readouterr()  # mlflow's "View run" lines of the registrations
    assert _cli(["registry", "promote", "--model", name, "--first-champion-min-map", "0.25",
                 "--tracking-uri", mlflow_env.uri, "--json"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert json.loads(out)["champion_after"] == "2", out
    assert client.get_model_version_by_alias(name, CHAMPION).version == "2"


def test_promote_errors(mlflow_env: MlflowServer) -> None:
    with pytest.raises(RegistryError, match="no registered model named"):
        promote(_name(), settings=_settings(mlflow_env))
    name = _name()
    MlflowClient(mlflow_env.uri).create_registered_model(name)
    with pytest.raises(RegistryError, match="no challenger"):
        promote(name, settings=_settings(mlflow_env))
    with pytest.raises(RegistryError, match=">= 0"):
        promote(name, min_gain=-1, settings=_settings(mlflow_env))


_PROCESS_REGISTRATION = """
import os, sys
from pathlib import Path
from retinaflow.mlops.registry import ModelFiles, register_model
from retinaflow.mlops.settings import TrackingSettings
path = Path(sys.argv[2]); path.write_bytes(os.urandom(32))
mv = register_model(sys.argv[1], files=ModelFiles(checkpoint=path), map_value=0.1,
              settings=TrackingSettings(tracking_uri=sys.argv[3], experiment="registry-tests"))
print(mv.version)
"""


def test_concurrent_registrations_from_threads_and_processes(
    mlflow_env: MlflowServer, tmp_path: Path
) -> None:
    name = _name()
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_REGISTRATION, name, str(tmp_path / f"p{i}.pth"), mlflow_env.uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    barrier, versions, errors = threading.Barrier(5), [], []

    def worker(i: int) -> None:
        ckpt = tmp_path / f"t{i}.pth"
        ckpt.write_bytes(os.urandom(32))
        barrier.wait()
        try:
            versions.append(register_model(name, files=ModelFiles(checkpoint=ckpt), map_value=0.1,
                                     settings=_settings(mlflow_env)).version)  # fmt: skip
        except Exception as exc:  # collected, reported by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        versions.append(out.strip().splitlines()[-1])
    assert not errors
    assert sorted(int(v) for v in versions) == list(range(1, 8))  # distinct versions, none lost
    client = MlflowClient(mlflow_env.uri)
    assert (
        client.get_model_version_by_alias(name, CHALLENGER).version == "7"
    )  # the newest, whatever the order
    assert all(
        mv.tags.get("retinaflow.registered") == "true"
        for mv in client.search_model_versions(f"name='{name}'")
    )


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="retinaflow")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_registry_cli(mlflow_env: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, uri = _name(), mlflow_env.uri
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"w")
    assert _cli(["registry", "register", "--model", name, "--checkpoint", str(ckpt), "--map", "0.3",
                 "--latency-ms", "8", "--tracking-uri", uri]) == 0  # fmt: skip
    assert f"registered {name} version 1 (alias challenger)" in capsys.readouterr().out
    assert _cli(["registry", "promote", "--model", name, "--tracking-uri", uri, "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["promoted"] and decision["champion_after"] == "1"
    _version(name, tmp_path, mlflow_env, 0.302, 8.0)
    assert _cli(["registry", "promote", "--model", name, "--min-gain", "0.01", "--tracking-uri", uri]) == 0
    assert f"{name} v2 refused: mAP 0.3020 vs 0.3000" in capsys.readouterr().out
    assert _cli(["registry", "list", "--model", name, "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.strip().startswith("│ ")]
    assert len(lines) == 2 and "challenger" in lines[0] and "refused" in lines[0]
    assert "champion" in lines[1] and "0.3000" in lines[1] and "8.00" in lines[1]
