"""The CLI turns every bad input into one line on stderr and a non-zero exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from retinaflow.cli import build_parser, main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("retinaflow:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]


def test_help_lists_every_command():
    text = build_parser().format_help()
    for cmd in ("train", "infer", "eval", "export", "data", "registry", "pipeline", "demo"):
        assert cmd in text
    train_help = subprocess.run(
        [sys.executable, "-m", "retinaflow", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--images", "--backbone", "--iters", "--lr", "--batch", "--jitter", "--precision", "--set"):
        assert flag in train_help


def test_missing_training_paths(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "train",
        str(tmp_path / "m.pth"),
        "--images",
        str(tmp_path / "nope"),
        "--annotations",
        str(tmp_path / "nope.json"),
    )
    assert_one_line_error(code, err, "not found")


def test_unknown_config_key_and_bad_yaml(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", str(tmp_path / "m.pth"), "--set", "train.nope=1")
    assert_one_line_error(code, err, "unknown config key")
    bad = tmp_path / "c.yaml"
    bad.write_text("train: {iters: many}")
    code, _, err = run_cli(capsys, "train", str(tmp_path / "m.pth"), "--config", str(bad))
    assert_one_line_error(code, err, "expects an integer")


def test_infer_with_a_corrupt_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"garbage")
    (tmp_path / "imgs").mkdir()
    code, _, err = run_cli(
        capsys, "infer", str(ckpt), "--images", str(tmp_path / "imgs"), "--output", "x.json"
    )
    assert_one_line_error(code, err, "cannot read checkpoint")


def test_eval_bad_inputs(capsys, tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(
        json.dumps({"images": [{"id": 1, "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}]})
    )
    code, _, err = run_cli(
        capsys, "eval", "--annotations", str(gt), "--detections", str(tmp_path / "none.json")
    )
    assert_one_line_error(code, err, "not found")
    dets = tmp_path / "d.json"
    dets.write_text(json.dumps([{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))
    code, _, err = run_cli(capsys, "eval", "--annotations", str(gt), "--detections", str(dets))
    assert_one_line_error(code, err, "absent")


def test_export_rejects_a_size_that_is_not_a_multiple_of_32(capsys, tmp_path):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"x")
    code, _, err = run_cli(capsys, "export", str(ckpt), str(tmp_path / "m.onnx"), "--size", "100", "128")
    assert_one_line_error(code, err, "multiples of 32")


def test_synth_rejects_bad_arguments(capsys, tmp_path):
    code, _, err = run_cli(capsys, "data", "synth", "--out", str(tmp_path), "--images", "1")
    assert_one_line_error(code, err, "at least 2")


def test_a_real_process_exits_non_zero_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retinaflow",
            "eval",
            "--annotations",
            str(tmp_path / "a.json"),
            "--detections",
            "b",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["--version"]])
def test_version(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "retinaflow" in capsys.readouterr().out


def test_infer_output_that_is_a_folder_fails_before_inference(capsys, tmp_path, monkeypatch):
    import retinaflow.engine.infer as infer_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(infer_module, "load_model", no_model)
    (tmp_path / "imgs").mkdir()
    code, _, err = run_cli(
        capsys,
        "infer",
        str(tmp_path / "m.pth"),
        "--images",
        str(tmp_path / "imgs"),
        "--output",
        str(tmp_path),
    )
    assert_one_line_error(code, err, "is a folder")


@pytest.mark.parametrize("verbose", [False, True])
def test_torchs_value_range_warnings_are_hidden_unless_verbose(verbose, capsys):
    """A compile of symbolic sizes logs torch's "failed while executing pow_by_natural" warnings; the
    CLI hides them (they are not the user's problem) and shows them again with -v."""
    import logging

    noisy = logging.getLogger("torch.utils._sympy.interp")
    level = noisy.level
    noisy.setLevel(logging.NOTSET)  # (setLevel also clears the loggers' isEnabledFor caches)
    try:
        assert main([*(["-v"] if verbose else []), "backbones"]) == 0
        assert noisy.isEnabledFor(logging.WARNING) is verbose
    finally:
        noisy.setLevel(level)
