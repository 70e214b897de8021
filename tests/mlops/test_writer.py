"""The run writer's in-memory buffer while the tracking server is unreachable: bounded, oldest metric
records dropped first, the drop counted and reported."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient
from tests.mlops.conftest import free_port

from retinaflow.mlops.runs import describe
from retinaflow.mlops.settings import TrackingSettings
from retinaflow.mlops.writer import RunWriter


def test_buffer_cap_drops_the_oldest_metric_records_and_reports_them(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: the whole run is one outage
    settings = TrackingSettings(
        tracking_uri=uri, max_buffered_records=10, probe_interval=0.05, probe_timeout=0.5
    )
    writer = RunWriter(MlflowClient(uri), "0" * 32, uri, settings)
    writer.log_params({"lr": 0.01})
    for step in range(30):
        writer.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.01}, step)
        assert writer.queued <= 11  # never more than the cap (+1 for the record being probed)
    writer.set_status("FINISHED")

    report = writer.close(timeout=0.2, spill=tmp_path / "spill.json")

    # params, the 8 newest metric records and the status are kept; the 22 oldest metric records are not
    assert report.dropped == 22 and report.dropped_metrics == 44
    assert report.pending == 10 and report.pending_metrics == 16
    assert not report.complete
    kept = json.loads((tmp_path / "spill.json").read_text())["records"]
    assert kept[0]["params"] == {"lr": "0.01"} and kept[-1]["status"] == "FINISHED"
    assert [r["metrics"][0][3] for r in kept[1:-1]] == list(range(22, 30))
    message = describe(report, uri)
    assert "22 metric record(s) (44 metric points) dropped and lost" in message


def test_default_buffer_cap_is_generous() -> None:
    assert TrackingSettings().max_buffered_records >= 100_000
