from __future__ import annotations

import pytest

from retinaflow.config import Config
from retinaflow.errors import ConfigError


def test_defaults_keep_odtks_schedule_length_and_loss_constants():
    c = Config()
    assert (c.train.batch, c.train.warmup, c.train.iters) == (16, 1000, 90000)
    assert c.train.milestones == (60000, 80000)  # used by the step schedule (ODTK's preset)
    assert (c.loss.alpha, c.loss.gamma, c.loss.smooth_l1_beta) == (0.25, 2.0, 0.11)
    assert (c.matcher.bg_iou, c.matcher.fg_iou) == (0.4, 0.5)
    assert c.model.anchors.num_anchors == 9
    assert (c.infer.score_thresh, c.infer.top_n, c.infer.nms_iou, c.infer.max_det) == (0.05, 1000, 0.5, 100)


def test_dict_and_yaml_round_trip(tmp_path):
    c = Config().override(["train.lr=0.02", "data.jitter=[512, 800]", "model.backbone=resnet18"])
    assert c.train.lr == 0.02 and c.data.jitter == (512, 800) and c.model.backbone == "resnet18"
    path = tmp_path / "c.yaml"
    c.dump(path)
    assert Config.load(path) == c
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nosection.x=1", "unknown config key"),
        ("train.iters=ten", "expects an integer"),
        ("train.lr=[1]", "expects a number"),
        ("train.channels_last=3", "expects true/false"),
        ("train.milestones=5", "expects a list"),
        ("noequals", "section.key=value"),
        (
            "train.grad_sync=allreduce",
            "train.grad_sync must be one of auto, ddp, after_backward, got allreduce",
        ),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        Config().override([override])
    assert "\n" not in str(err.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        Config.load(scalar)


def test_schedule_scales_iterations():
    c = Config().override(["train.schedule=0.5"])
    assert c.train.scaled(c.train.warmup) == 500


def test_checkpoints_from_before_model_norm_still_load() -> None:
    old = Config().to_dict()
    del old["model"]["norm"], old["model"]["head_norm"]
    frozen = Config.from_dict({**old, "model": {**old["model"], "frozen_bn": True}}).model
    assert (frozen.norm, frozen.head_norm) == ("frozen_bn", "none")  # the network they were trained as
    assert Config.from_dict({**old, "model": {**old["model"], "frozen_bn": False}}).model.norm == "bn"
    assert Config().model.norm == "auto" and Config().model.head_norm == "bn"


def test_one_range_check_per_value_wherever_it_is_set(tmp_path):
    with pytest.raises(ConfigError, match=r"infer.nms_iou must be in \[0, 1\], got 1.5"):
        Config().override(["infer.nms_iou=1.5"])
    with pytest.raises(ConfigError, match=r"train\.checkpoint_every must be >= 0"):
        Config().set_key("train.checkpoint_every", -1)
    bad = tmp_path / "c.yaml"
    bad.write_text("train: {iters: 0}")
    with pytest.raises(ConfigError, match=r"train\.iters must be positive"):
        Config.load(bad)
    c = Config()
    c.set_key("model.anchors.strides", [8, 16])  # nested sections are rebuilt, typed
    assert c.model.anchors.strides == (8, 16)
