"""`retinaflow demo`: the core-only job (no MLflow or Kubeflow needed) runs end to end."""

from __future__ import annotations

import json

from retinaflow.cli import main


def test_core_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--iters", "2", "--images", "12"]) == 0
    printed = capsys.readouterr().out
    for name in ("config.yaml", "model.pth", "detections.json", "eval.json", "model.onnx"):
        assert (out / name).is_file(), name
        assert str(out / name) in printed
    report = json.loads((out / "eval.json").read_text())
    assert set(report["stats"]) >= {"AP", "AP50"} and "mAP (val, IoU .50:.95)" in printed
