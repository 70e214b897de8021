"""Inference: COCO results in original-image pixels, with and without ground truth; CUDA graphs."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import tiny_config

from retinaflow.engine.infer import infer, load_model, make_detector
from retinaflow.engine.train import train
from retinaflow.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory):
    return train(tiny_config(synth_small, iters=2), tmp_path_factory.mktemp("infer") / "m.pth")


def test_infer_writes_coco_results_in_original_pixels(trained, synth_small, tmp_path):
    cfg = tiny_config(synth_small).infer
    cfg.score_thresh = 0.0  # an untrained model: keep every candidate so there is something to check
    result = infer(
        trained, synth_small.val_images, tmp_path / "d.json", cfg, synth_small.val_annotations, "cpu"
    )
    dets = json.loads((tmp_path / "d.json").read_text())
    gt = json.loads(synth_small.val_annotations.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    assert dets and result is not None and result.num_images == len(gt["images"])
    per_image: dict[int, int] = {}
    for d in dets:
        w, h = sizes[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert d["category_id"] in cats and 0.0 <= d["score"] <= 1.0
        assert x >= -0.01 and y >= -0.01 and x + bw <= w + 0.01 and y + bh <= h + 0.01
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) <= cfg.max_det


def test_infer_on_a_bare_folder_of_images(trained, synth_small, tmp_path):
    cfg = tiny_config(synth_small).infer
    assert infer(trained, synth_small.val_images, tmp_path / "d.json", cfg, None, "cpu") is None
    ids = {d["image_id"] for d in json.loads((tmp_path / "d.json").read_text())}
    assert ids <= set(range(1, 100))
    with pytest.raises(DataError, match="no images"):
        infer(trained, tmp_path, tmp_path / "e.json", cfg, None, "cpu")
    with pytest.raises(DataError, match="not found"):
        infer(trained, tmp_path / "none", tmp_path / "e.json", cfg, None, "cpu")


def test_inference_only_detector_folds_batchnorm_and_keeps_detections(trained):
    from torchvision.ops.misc import FrozenBatchNorm2d

    model, config, _ = load_model(trained, torch.device("cpu"))
    config.infer.score_thresh = 0.0
    reference = make_detector(load_model(trained, torch.device("cpu"))[0], config, None)
    folded = make_detector(model, config, None, inference_only=True)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    images = torch.randint(
        0, 256, (2, 3, 128, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    sizes = torch.tensor([[128, 256], [100, 200]])
    a, b = folded(images, sizes), reference(images, sizes)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.boxes, b.boxes, atol=1e-3, rtol=1e-4)


def test_compiled_detector_equals_eager(trained):
    model, config, _ = load_model(trained, torch.device("cpu"))
    config.infer.score_thresh = 0.0
    reference = make_detector(model, config, None)
    config.infer.compile = "eager"  # graph capture without code generation: fast on a CPU
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = make_detector(model, config, None)
    images = torch.randint(0, 256, (1, 3, 128, 192), dtype=torch.uint8)
    sizes = torch.tensor([[128, 192]])
    a, b = compiled(images, sizes), reference(images, sizes)
    assert counters["stats"]["unique_graphs"] > 0  # the network really went through torch.compile
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.boxes, b.boxes)


def test_infer_pads_batches_to_infer_pad_stride(trained, synth_small, tmp_path, monkeypatch):
    from retinaflow.data import loader as loader_module

    shapes: list[tuple[int, ...]] = []
    build = loader_module.build_eval_loader

    def spy(*args, **kwargs):
        loader, dataset = build(*args, **kwargs)
        shapes.extend(tuple(b.images.shape[-2:]) for b in loader)
        return loader, dataset

    monkeypatch.setattr(loader_module, "build_eval_loader", spy)
    cfg = tiny_config(synth_small).infer
    cfg.pad_stride = 96
    infer(trained, synth_small.val_images, tmp_path / "d.json", cfg, None, "cpu")
    assert shapes and all(h % 96 == 0 and w % 96 == 0 for h, w in shapes)
    assert any(h % 128 or w % 128 for h, w in shapes)  # not the training padding


def test_infer_rejects_a_bad_pad_stride(trained, synth_small, tmp_path):
    cfg = tiny_config(synth_small).infer
    cfg.pad_stride = 0
    with pytest.raises(ConfigError, match="pad_stride"):
        infer(trained, synth_small.val_images, tmp_path / "d.json", cfg, None, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_detector_equals_eager(trained):
    model, config, _ = load_model(trained, torch.device("cuda"))
    config.infer.score_thresh = 0.0
    eager = make_detector(model, config, torch.float16, inference_only=True)
    config.infer.cuda_graph = True
    graphed = make_detector(model, config, None)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((2, 3, 128, 256), (1, 3, 256, 128), (2, 3, 128, 256)):
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda", generator=gen)
        sizes = torch.tensor([[shape[2], shape[3]]] * shape[0], device="cuda")
        a, b = eager(images, sizes), graphed(images, sizes)
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.scores, b.scores)
        torch.testing.assert_close(a.boxes, b.boxes)
    assert len(graphed.graphs) == 2  # type: ignore[attr-defined]


def test_cli_infer_starts_from_the_checkpoints_settings(trained, synth_small, tmp_path, capsys):
    """``--set infer.*`` given at training time is honoured by ``retinaflow infer`` (as by the pipeline's
    evaluate step); a flag overrides only its own setting."""
    from retinaflow.cli import main
    from retinaflow.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained)
    state["config"]["infer"].update(score_thresh=0.0, max_det=2)
    ckpt = save_checkpoint(tmp_path / "m.pth", state)

    def per_image(*flags: str) -> set[int]:
        out = tmp_path / "d.json"
        argv = ["infer", str(ckpt), "--images", str(synth_small.val_images), "--output", str(out)]
        assert main([*argv, "--device", "cpu", *flags]) == 0
        counts: dict[int, int] = {}
        for d in json.loads(out.read_text()):
            counts[d["image_id"]] = counts.get(d["image_id"], 0) + 1
        return set(counts.values())

    assert per_image() == {2}
    assert per_image("--max-det", "3") == {3}


def test_detections_name_their_image_files(trained, synth_small, tmp_path):
    """Detections of a bare folder (ids 1..N in file order) carry the file name, so that ``eval``
    against an annotation file numbering the same images differently refuses instead of mispairing."""
    from retinaflow.engine.evaluate import evaluate_detections

    cfg = tiny_config(synth_small).infer
    cfg.score_thresh = 0.0
    infer(trained, synth_small.val_images, tmp_path / "d.json", cfg, None, "cpu")
    dets = json.loads((tmp_path / "d.json").read_text())
    files = sorted(p.name for p in synth_small.val_images.iterdir())
    assert dets and all(d["file_name"] == files[d["image_id"] - 1] for d in dets)
    gt = json.loads(synth_small.val_annotations.read_text())
    renumbered = {im["file_name"]: len(files) - files.index(im["file_name"]) for im in gt["images"]}
    for im in gt["images"]:
        im["id"] = renumbered[im["file_name"]]
    gt["annotations"] = []
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(DataError, match="other images"):
        evaluate_detections(tmp_path / "gt.json", tmp_path / "d.json")
