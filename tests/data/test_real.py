from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from retinaflow.data.photos import CLASSES, load_bank
from retinaflow.data.real import RealConfig, compose, generate
from retinaflow.errors import ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bank_has_every_class_with_real_pixels() -> None:
    bank = load_bank()
    assert list(bank.objects) == list(CLASSES)
    assert len(bank.objects["coin"]) == 24 and len(bank.objects["face"]) >= 100
    for crops in bank.objects.values():
        for crop in crops:
            x1, y1, x2, y2 = crop.box
            assert 0 <= x1 < x2 <= crop.rgb.shape[1] and 0 <= y1 < y2 <= crop.rgb.shape[0]
            assert crop.rgb.dtype == np.uint8 and crop.rgb.std() > 10  # a photo, not a flat patch
    assert len(bank.backgrounds) >= 10 and bank.distractors


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    a = generate(RealConfig(out=tmp_path / "a", train_images=6, val_images=2, seed=1))
    b = generate(RealConfig(out=tmp_path / "b", train_images=6, val_images=2, seed=1, workers=2))
    c = generate(RealConfig(out=tmp_path / "c", train_images=6, val_images=2, seed=2))
    fa, fb, fc = (_files(Path(p.train_images).parent) for p in (a, b, c))
    assert len(fa) == 8 + 2 and fa == fb
    assert fa["annotations/train.json"] != fc["annotations/train.json"]

    train, val = COCO(str(a.train_annotations)), COCO(str(a.val_annotations))
    assert len(train.getImgIds()) == 6 and len(val.getImgIds()) == 2
    assert [c["name"] for c in train.loadCats(train.getCatIds())] == list(CLASSES)
    for img in train.loadImgs(train.getImgIds()):
        w, h = Image.open(Path(a.train_images) / img["file_name"]).size
        assert (w, h) == (img["width"], img["height"])
        for ann in train.loadAnns(train.getAnnIds(imgIds=img["id"])):
            x, y, bw, bh = ann["bbox"]
            assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h and min(bw, bh) >= 6
            assert 0 < ann["area"] <= bw * bh


def test_boxes_are_tight_around_visible_pixels_and_objects_occlude_little() -> None:
    bank = load_bank()
    cfg = RealConfig(out=Path("unused"))
    counts = [len(compose(bank, cfg, i)[1]) for i in range(12)]
    assert all(1 <= n <= 5 for n in counts) and sum(counts) > 12
    for i in range(12):
        for _, (_, _, bw, bh), area in compose(bank, cfg, i)[1]:
            assert area >= 0.2 * bw * bh  # at least an ellipse's worth of the box, after occlusion


def test_bad_sizes_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="object_size"):
        generate(RealConfig(out=tmp_path, object_size=(200, 100)))
    with pytest.raises(ConfigError, match="train_images"):
        generate(RealConfig(out=tmp_path, train_images=0))
