from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from retinaflow.data.synthetic import SHAPES, SynthConfig, generate
from retinaflow.errors import ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth40(tmp_path_factory: pytest.TempPathFactory):
    return generate(SynthConfig(out=tmp_path_factory.mktemp("synth40"), images=40, seed=5))


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = _files(Path(generate(SynthConfig(out=tmp_path / "a", images=8, seed=3)).train_images).parent)
    b = _files(Path(generate(SynthConfig(out=tmp_path / "b", images=8, seed=3)).train_images).parent)
    c = _files(Path(generate(SynthConfig(out=tmp_path / "c", images=8, seed=4)).train_images).parent)
    assert len(a) == 8 + 2 and a.keys() == b.keys() == c.keys()
    assert a == b
    assert a["annotations/train.json"] != c["annotations/train.json"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".jpg")) == 8


def test_coco_json_is_valid_and_boxes_lie_inside_images(synth40) -> None:
    train, val = COCO(str(synth40.train_annotations)), COCO(str(synth40.val_annotations))
    assert len(train.getImgIds()) == 32 and len(val.getImgIds()) == 8
    assert set(train.getImgIds()).isdisjoint(val.getImgIds())
    for coco, folder in ((train, synth40.train_images), (val, synth40.val_images)):
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
        assert coco.getCatIds() == list(range(1, len(SHAPES) + 1))
        ann_ids = coco.getAnnIds()
        assert len(ann_ids) == len(set(ann_ids)) >= len(coco.getImgIds())
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(Path(folder) / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.format == "JPEG"
            for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                x, y, w, h = a["bbox"]
                assert a["iscrowd"] == 0 and w > 0 and h > 0
                assert x >= 0 and y >= 0 and x + w <= img["width"] + 0.01 and y + h <= img["height"] + 0.01
                assert 0 < a["area"] <= w * h + 0.1


def test_variety_of_classes_sizes_aspects_and_images(synth40) -> None:
    doc = json.loads(Path(synth40.train_annotations).read_text())
    anns = doc["annotations"]
    assert {a["category_id"] for a in anns} == set(range(1, len(SHAPES) + 1))
    long_sides = np.array([max(a["bbox"][2:]) for a in anns])
    assert long_sides.min() >= 16 - 0.01 and long_sides.max() <= 128 + 0.01
    assert (long_sides < 32).any() and (long_sides > 96).any()
    aspects = np.array([a["bbox"][2] / a["bbox"][3] for a in anns])
    assert (aspects < 0.85).any() and (aspects > 1.15).any()
    assert len({(i["width"], i["height"]) for i in doc["images"]}) > 10
    per_image = np.bincount([a["image_id"] for a in anns])
    assert per_image.max() >= 4
    # some objects overlap one another
    overlaps = 0
    for img in doc["images"]:
        boxes = [a["bbox"] for a in anns if a["image_id"] == img["id"]]
        for i, (x, y, w, h) in enumerate(boxes):
            for u, v, s, t in boxes[i + 1 :]:
                overlaps += min(x + w, u + s) > max(x, u) and min(y + h, v + t) > max(y, v)
    assert overlaps > 0


def test_objects_stand_out_from_their_background(synth40) -> None:
    """Isolated squares: the inside colour differs clearly from a band just outside the box."""
    doc = json.loads(Path(synth40.train_annotations).read_text())
    checked = 0
    for img in doc["images"]:
        boxes = [a for a in doc["annotations"] if a["image_id"] == img["id"]]
        pixels = np.asarray(Image.open(Path(synth40.train_images) / img["file_name"]), dtype=np.float32)
        for a in boxes:
            x, y, w, h = (round(v) for v in a["bbox"])
            if a["category_id"] != 2 or len(boxes) > 1 or min(w, h) < 12:
                continue
            inside = pixels[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].reshape(-1, 3).mean(0)
            y0, y1, x0, x1 = (
                max(y - 4, 0),
                min(y + h + 4, img["height"]),
                max(x - 4, 0),
                min(x + w + 4, img["width"]),
            )
            band = np.ones((y1 - y0, x1 - x0), dtype=bool)
            band[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = False
            outside = pixels[y0:y1, x0:x1][band].mean(0)
            assert np.linalg.norm(inside - outside) > 40
            checked += 1
    assert checked > 0


def test_regeneration_removes_stale_images_and_class_subset(tmp_path: Path) -> None:
    generate(SynthConfig(out=tmp_path, images=10, seed=0))
    paths = generate(
        SynthConfig(out=tmp_path, images=5, seed=0, val_fraction=0.4, classes=("circle", "ring"))
    )
    for folder, ann_path in (
        (paths.train_images, paths.train_annotations),
        (paths.val_images, paths.val_annotations),
    ):
        doc = json.loads(Path(ann_path).read_text())
        assert sorted(p.name for p in Path(folder).iterdir()) == sorted(i["file_name"] for i in doc["images"])
        assert [c["name"] for c in doc["categories"]] == ["circle", "ring"]
    assert len(list(Path(paths.val_images).iterdir())) == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"classes": ("circle", "hexagon")}, {"val_fraction": 1.0}, {"images": 0}, {"image_size": (300, 200)}],
)
def test_bad_settings_raise_config_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate(SynthConfig(out=tmp_path, **kwargs))
