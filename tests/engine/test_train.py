"""Training loop behaviour: exact resume, divergence, fine-tuning, architecture checks, callbacks."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import tiny_config

from retinaflow.config import Config
from retinaflow.engine.callbacks import Callback
from retinaflow.engine.checkpoint import load_checkpoint
from retinaflow.engine.train import train
from retinaflow.errors import CheckpointError, ConfigError, TrainingDiverged


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, state):
        self.events.append(("start", state.iteration, state.resumed))

    def on_step(self, state, metrics):
        self.events.append(("step", state.iteration, dict(metrics)))

    def on_checkpoint(self, state, path):
        self.events.append(("checkpoint", state.iteration))

    def on_train_end(self, state, path):
        self.events.append(("end", state.iteration))

    def on_error(self, state, error):
        self.events.append(("error", type(error).__name__))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synth_small, tmp_path):
    straight = train(tiny_config(synth_small, iters=4), tmp_path / "straight.pth")
    half = tiny_config(synth_small, iters=2)
    train(half, tmp_path / "resumed.pth")
    assert load_checkpoint(tmp_path / "resumed.pth")["iteration"] == 2
    rec = Recorder()
    train(tiny_config(synth_small, iters=4), tmp_path / "resumed.pth", [rec])
    a, b = load_checkpoint(straight), load_checkpoint(tmp_path / "resumed.pth")
    assert a["iteration"] == b["iteration"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert rec.events[0] == ("start", 2, True)
    assert rec.events[-1] == ("end", 4)


def test_checkpoint_is_self_describing(synth_small, tmp_path):
    rec = Recorder()
    path = train(tiny_config(synth_small, iters=2), tmp_path / "m.pth", [rec])
    ckpt = load_checkpoint(path)
    names = [
        c["name"]
        for c in sorted(
            json.loads(synth_small.train_annotations.read_text())["categories"], key=lambda c: c["id"]
        )
    ]
    assert ckpt["class_names"] == names
    assert ckpt["arch"]["num_classes"] == len(names) == ckpt["config"]["model"]["num_classes"]
    assert set(ckpt) >= {"optimizer", "rng", "iteration", "format_version", "category_ids"}
    steps = [e for e in rec.events if e[0] == "step"]
    assert len(steps) == 2 and {"loss", "cls", "box", "lr", "img_s"} <= set(steps[0][2])
    assert all(torch.isfinite(torch.tensor(e[2]["loss"])) for e in steps)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth_small, tmp_path, monkeypatch):
    import retinaflow.engine.train as train_module

    path = tmp_path / "m.pth"
    train(tiny_config(synth_small, iters=2), path)
    real = train_module.detection_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_module, "detection_loss", poisoned)
    rec = Recorder()
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(tiny_config(synth_small, iters=6), path, [rec])
    assert load_checkpoint(path)["iteration"] == 2
    assert rec.events[-1] == ("error", "TrainingDiverged")


def test_a_non_finite_loss_between_log_steps_is_named_and_never_checkpointed(
    synth_small, tmp_path, monkeypatch
):
    """The loss is checked at log steps and before each checkpoint, not every iteration: the first bad
    iteration is still the one named, and no weights trained past it are saved."""
    import retinaflow.engine.train as train_module

    real, calls = train_module.detection_loss, []

    def poisoned_third(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(train_module, "detection_loss", poisoned_third)
    cfg = tiny_config(synth_small, iters=8)
    cfg.train.log_every, cfg.train.checkpoint_every = 4, 2
    rec = Recorder()
    with pytest.raises(TrainingDiverged, match="non-finite at iteration 3;"):
        train(cfg, tmp_path / "m.pth", [rec])
    assert len(calls) == 4  # found at the check before iteration 4's checkpoint
    assert load_checkpoint(tmp_path / "m.pth")["iteration"] == 2
    assert [e[0] for e in rec.events] == ["start", "checkpoint", "error"]


def test_resume_with_another_architecture_is_refused(synth_small, tmp_path):
    path = train(tiny_config(synth_small, iters=2), tmp_path / "m.pth")
    other = tiny_config(synth_small, iters=4)
    other.model.fpn_channels = 48
    with pytest.raises(CheckpointError, match=r"fpn_channels=32.*fpn_channels=48"):
        train(other, path)


def test_resume_with_another_optimizer_is_refused_with_the_flag_that_resumes(synth_small, tmp_path):
    sgd = tiny_config(synth_small, iters=2)
    sgd.train.optimizer, sgd.train.lr = "sgd", 0.01
    path = train(sgd, tmp_path / "m.pth")
    default = tiny_config(synth_small, iters=4)  # AdamW, the default
    with pytest.raises(
        CheckpointError, match=r"train\.optimizer=sgd.*asks for adamw.*--set train\.optimizer=sgd"
    ):
        train(default, path)
    sgd.train.iters = 4
    assert load_checkpoint(train(sgd, path))["iteration"] == 4


def test_fine_tune_from_a_checkpoint_with_another_class_count(synth_small, tmp_path):
    source = train(tiny_config(synth_small, iters=2), tmp_path / "src.pth")
    data = json.loads(synth_small.train_annotations.read_text())
    keep = sorted(c["id"] for c in data["categories"])[:2]
    data["categories"] = [c for c in data["categories"] if c["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
    subset = tmp_path / "two_classes.json"
    subset.write_text(json.dumps(data))
    cfg = tiny_config(synth_small, iters=2)
    cfg.data.annotations = str(subset)
    cfg.train.fine_tune = str(source)
    out = load_checkpoint(train(cfg, tmp_path / "ft.pth"))
    assert out["arch"]["num_classes"] == 2
    src = load_checkpoint(source)["model"]
    backbone_keys = [k for k in src if k.startswith("backbone.") and src[k].is_floating_point()]
    frozen = [k for k in backbone_keys if "bn" in k or "running" in k]
    assert frozen and all(torch.equal(src[k], out["model"][k]) for k in frozen)


def test_bad_training_configs(synth_small, tmp_path):
    cfg = tiny_config(synth_small)
    cfg.data.images = None
    with pytest.raises(ConfigError, match="--images"):
        train(cfg, tmp_path / "m.pth")
    cfg = tiny_config(synth_small)
    cfg.data.val_images = str(synth_small.val_images)
    with pytest.raises(ConfigError, match="both"):
        train(cfg, tmp_path / "m.pth")
    for backend in ("", "eager"):  # CUDA graphs replay inductor's code: nothing else to replay
        cfg = tiny_config(synth_small)
        cfg.train.compile, cfg.train.cuda_graph = backend, True
        with pytest.raises(ConfigError, match="--compile"):
            train(cfg, tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists()


def test_validation_every_n_iterations_reports_coco_stats(synth_small, tmp_path):
    class Validations(Callback):
        def __init__(self):
            self.seen = []

        def on_validation(self, state, result):
            self.seen.append((state.iteration, result))

    cfg = tiny_config(synth_small, iters=2)
    cfg.data.val_images, cfg.data.val_annotations = (
        str(synth_small.val_images),
        str(synth_small.val_annotations),
    )
    cfg.train.val_every = 1
    rec = Validations()
    train(cfg, tmp_path / "m.pth", [rec])
    assert [it for it, _ in rec.seen] == [1, 2]  # every iteration, then once more at the end
    result = rec.seen[-1][1]
    assert len(result.stats) == 12 and 0.0 <= result.map <= 1.0
    assert set(result.per_class) == set(load_checkpoint(tmp_path / "m.pth")["class_names"])


def test_resume_on_other_classes_is_refused(synth_small, tmp_path):
    path = train(tiny_config(synth_small, iters=2), tmp_path / "m.pth")
    data = json.loads(synth_small.train_annotations.read_text())
    for cat in data["categories"]:
        cat["name"] = f"renamed-{cat['name']}"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    cfg = tiny_config(synth_small, iters=4)
    cfg.data.annotations = str(renamed)
    with pytest.raises(CheckpointError, match="--fine-tune"):
        train(cfg, path)


def test_compiled_network_trains_like_the_eager_one(synth_small, tmp_path):
    eager = load_checkpoint(train(tiny_config(synth_small, iters=2), tmp_path / "eager.pth"))["model"]
    cfg = tiny_config(synth_small, iters=2)
    cfg.train.compile = "eager"  # graph capture without code generation: fast on a CPU
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = load_checkpoint(train(cfg, tmp_path / "compiled.pth"))["model"]
    assert counters["stats"]["unique_graphs"] > 0  # the network really went through torch.compile
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6)


def test_compiled_training_on_several_bucket_shapes_compiles_one_graph(synth_small, tmp_path):
    # height and width are symbolic from the first batch on: no static graph first, then a dynamic one
    cfg = tiny_config(synth_small, iters=8)
    cfg.train.compile = "eager"
    cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 96, 192, (64, 128)  # four bucket shapes
    counters = torch._dynamo.utils.counters
    counters.clear()
    train(cfg, tmp_path / "m.pth")
    assert counters["stats"]["calls_captured"] > 0 and counters["stats"]["unique_graphs"] == 1


_SHAPES_BACKEND = "retinaflow_test_input_sizes"
_graph_sizes: list[tuple[object, ...]] = []  # the image input's sizes of each graph compiled


def _record_input_sizes(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
    """A ``torch.compile`` backend that runs the graph as captured, noting its image input's sizes
    (``torch.SymInt`` where dynamo made them symbolic)."""
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]  # fake: symbolic
    tensors = [x for x in values if isinstance(x, torch.Tensor)]
    images = next(x for x in tensors if x.dim() in (4, 6) and not x.requires_grad)  # not a weight; 6: blocks
    _graph_sizes.append(tuple(images.shape))
    return gm.forward


if _SHAPES_BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_record_input_sizes, name=_SHAPES_BACKEND)


def test_static_compile_shapes_compile_one_graph_per_bucket(synth_small, tmp_path, monkeypatch):
    import retinaflow.engine.train as train_module

    seen: set[tuple[int, int]] = set()
    step = train_module._Trainer.step

    def recording_step(self, batch):
        seen.add(tuple(batch.images.shape[-2:]))
        return step(self, batch)

    monkeypatch.setattr(train_module._Trainer, "step", recording_step)
    cfg = tiny_config(synth_small, iters=8)
    cfg.train.compile, cfg.train.compile_shapes = _SHAPES_BACKEND, "static"
    cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 96, 192, (64, 128)  # four bucket shapes
    _graph_sizes.clear()
    # below the bucket count: the trainer must raise it, or dynamo would run later shapes eagerly
    with torch._dynamo.config.patch(recompile_limit=1):
        train(cfg, tmp_path / "m.pth")
    assert len(seen) >= 2  # the case under test: several shapes
    assert {sizes[-2:] for sizes in _graph_sizes} == seen  # one graph per shape, every size an int
    assert len(_graph_sizes) == len(seen)


def test_blocks_compile_one_graph_symbolic_in_whole_blocks_and_train_like_dynamic(synth_small, tmp_path):
    def run(shapes: str, name: str) -> dict[str, torch.Tensor]:
        cfg = tiny_config(synth_small, iters=6)
        cfg.train.compile, cfg.train.compile_shapes = _SHAPES_BACKEND, shapes
        cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 96, 192, (64, 128)  # four bucket shapes
        _graph_sizes.clear()
        weights = load_checkpoint(train(cfg, tmp_path / name))["model"]
        assert len(_graph_sizes) == 1, _graph_sizes  # one graph for every bucket
        return weights

    dynamic = run("dynamic", "dynamic.pth")
    blocks = run("blocks", "blocks.pth")
    (sizes,) = _graph_sizes
    stride = tiny_config(synth_small).data.pad_stride
    assert len(sizes) == 6 and sizes[3] == sizes[5] == stride  # (B, C, H/stride, stride, W/stride, stride)
    assert isinstance(sizes[2], torch.SymInt) and isinstance(sizes[4], torch.SymInt)
    for key, value in dynamic.items():  # the same network on the same batches
        torch.testing.assert_close(blocks[key], value, rtol=1e-5, atol=1e-6)


def test_static_compile_shapes_need_buckets(synth_small, tmp_path):
    cfg = tiny_config(synth_small, iters=1)
    cfg.train.compile, cfg.train.compile_shapes, cfg.data.shapes = "eager", "static", "stride"
    with pytest.raises(ConfigError, match=r"data\.shapes=buckets"):
        train(cfg, tmp_path / "m.pth")
    with pytest.raises(ConfigError, match="compile_shapes must be one of dynamic, blocks, static"):
        Config().set_key("train.compile_shapes", "sometimes")
    assert not (tmp_path / "m.pth").exists()


def test_a_compile_cache_that_names_a_directory_is_refused_before_training(synth_small, tmp_path):
    cfg = tiny_config(synth_small, iters=1)
    cfg.train.compile, cfg.train.compile_cache = "eager", str(tmp_path)
    with pytest.raises(ConfigError, match=r"names a directory .*--compile-cache DIR/retinaflow\.bin"):
        train(cfg, tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists()


def test_scratch_run_resolves_auto_norms_once_and_resumes_with_them(synth_small, tmp_path):
    cfg = tiny_config(synth_small, iters=1)
    cfg.model.norm, cfg.model.head_norm = "auto", "auto"
    path = train(cfg, tmp_path / "m.pth")
    saved = load_checkpoint(path)
    assert saved["arch"]["norm"] == "gn" and saved["arch"]["head_norm"] == "gn"
    assert saved["config"]["model"]["norm"] == "gn"
    again = tiny_config(synth_small, iters=2)
    again.model.norm, again.model.head_norm = "auto", "auto"
    assert load_checkpoint(train(again, path))["iteration"] == 2


def test_divergence_hint_names_the_scratch_norm_fix() -> None:
    from retinaflow.engine.train import _divergence_hint

    cfg = Config()
    cfg.model.norm, cfg.model.head_norm = "frozen_bn", "none"
    assert "model.norm=gn" in _divergence_hint(cfg)
    cfg.train.backbone_weights = "offline"
    assert "lower --lr" in _divergence_hint(cfg) and "head_norm=gn" in _divergence_hint(cfg)


def test_ema_is_saved_and_resumed_exactly(synth_small, tmp_path):
    def cfg(iters):
        c = tiny_config(synth_small, iters=iters)
        c.train.ema = 0.9
        return c

    straight = train(cfg(4), tmp_path / "straight.pth")
    train(cfg(2), tmp_path / "resumed.pth")
    train(cfg(4), tmp_path / "resumed.pth")
    a, b = load_checkpoint(straight), load_checkpoint(tmp_path / "resumed.pth")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4
    for key, value in a["ema"]["model"].items():
        torch.testing.assert_close(b["ema"]["model"][key], value)
    assert any(not torch.equal(a["ema"]["model"][k], a["model"][k]) for k in a["model"])


def test_resume_with_a_changed_batch_or_lr_says_so_once_each(synth_small, tmp_path, caplog):
    path = train(tiny_config(synth_small, iters=1), tmp_path / "m.pth")
    same = tiny_config(synth_small, iters=2)
    with caplog.at_level("WARNING", logger="retinaflow.engine.train"):
        train(same, path)
    assert not [r for r in caplog.records if "differs from the checkpoint" in r.getMessage()]
    changed = tiny_config(synth_small, iters=3)
    changed.train.batch, changed.train.lr = 4, changed.train.lr * 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="retinaflow.engine.train"):
        train(changed, path)
    lines = [r.getMessage() for r in caplog.records if "differs from the checkpoint" in r.getMessage()]
    assert lines == [
        f"resuming {path}: --batch 4 differs from the checkpoint's 2; continuing with 4",
        f"resuming {path}: --lr {changed.train.lr} differs from the checkpoint's "
        f"{changed.train.lr / 2}; continuing with {changed.train.lr}",
    ]
