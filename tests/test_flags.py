"""The flag table: parsers generated from it, values set on the config typed, one name per setting."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from retinaflow.config import Config
from retinaflow.errors import ConfigError
from retinaflow.flags import EXPORT_FLAGS, INFER_FLAGS, TRAIN_FLAGS, add_flags, apply_flags, given


def _parse(flags, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, flags)
    return parser.parse_args(list(argv))


def test_train_flags_are_typed_from_the_config():
    args = _parse(
        TRAIN_FLAGS, "--checkpoint-every", "50", "--lr", "0.02", "--milestones", "10", "20",
        "--jitter", "512", "800", "--compile", "--precision", "bf16",
    )  # fmt: skip
    config = apply_flags(Config(), args, TRAIN_FLAGS)
    t = config.train
    assert (t.checkpoint_every, t.lr, t.milestones, t.compile) == (50, 0.02, (10, 20), "inductor")
    assert config.data.jitter == (512, 800) and t.precision == "bf16"
    assert config.train.iters == Config().train.iters  # not given: the config's
    with pytest.raises(SystemExit):
        _parse(TRAIN_FLAGS, "--precision", "fp8")


def test_a_flag_value_is_checked_once_by_the_config():
    with pytest.raises(ConfigError, match=r"train\.checkpoint_every must be >= 0"):
        apply_flags(Config(), _parse(TRAIN_FLAGS, "--checkpoint-every", "-1"), TRAIN_FLAGS)
    assert given(_parse(INFER_FLAGS, "--nms-iou", "0.6", "--cuda-graph"), INFER_FLAGS) == {
        "infer.nms_iou": 0.6,
        "infer.cuda_graph": True,
    }
    assert given(_parse(INFER_FLAGS), INFER_FLAGS) == {}


def test_every_flag_names_a_config_key_by_its_last_part():
    for flag in (*TRAIN_FLAGS, *INFER_FLAGS, *EXPORT_FLAGS):
        section, name = flag.key.rsplit(".", 1)
        assert name in {f.name for f in dataclasses.fields(getattr(Config(), section))}, flag.key
        assert flag.option == "--" + name.replace("_", "-")
