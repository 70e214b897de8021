from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from retinaflow.data.validate import fingerprint, split_dataset, validate_dataset
from retinaflow.errors import ConfigError, DataError

from .conftest import ann, truncate, write_image


def test_validate_writes_cleaned_json_and_counts_every_kind(make_coco, tmp_path: Path) -> None:
    anns = [
        ann(1, 1, [1, 1, 10, 10]),
        ann(2, 1, [1, 1, 10, 10], category_id=5),  # unknown category
        ann(3, 2, [35, 25, 10, 10], category_id=2),  # clipped to 40x30
        ann(4, 2, [0, 0, 0, 0]),  # zero area
        ann(5, 3, [1, 1, 5, 5], iscrowd=1),  # crowd
        ann(6, 3, [100, 100, 5, 5]),  # outside
        ann(7, 4, [1, 1, 5, 5]),  # image 4 will be corrupt
        ann(8, 5, [1, 1, 5, 5]),  # image 5 missing on disk
        ann(9, 6, [1, 1, 5, 5]),  # image 6 has a wrong size in the JSON
    ]
    images, annotations = make_coco(6, anns)
    truncate(images / "000004.jpg")
    (images / "000005.jpg").unlink()
    doc = json.loads(annotations.read_text())
    doc["images"][5]["width"] = 41
    doc["info"] = {"description": "kept"}
    annotations.write_text(json.dumps(doc))

    out = tmp_path / "clean" / "instances.json"
    report = validate_dataset(images, annotations, out)
    expected = {
        "images_listed": 6,
        "images": 4,
        "annotations_listed": 9,
        "annotations": 3,
        "missing_files": 1,
        "corrupt_images": 1,
        "dropped_missing_image": 1,
        "dropped_corrupt_image": 1,
        "dropped_unknown_category": 1,
        "dropped_degenerate": 1,
        "dropped_crowd": 1,
        "dropped_outside": 1,
        "clipped": 1,
        "size_mismatch": 1,
    }
    assert {k: report[k] for k in expected} == expected
    assert report["class_names"] == ["a", "b"] and report["fingerprint"] == fingerprint(images, annotations)
    json.dumps(report)  # JSON-able for the CLI and the pipeline step

    coco = COCO(str(out))
    assert sorted(coco.getImgIds()) == [1, 2, 3, 6]
    assert sorted(a["id"] for a in coco.loadAnns(coco.getAnnIds())) == [1, 3, 9]
    assert coco.loadAnns(3)[0]["bbox"] == [35.0, 25.0, 5.0, 5.0] and coco.loadAnns(3)[0]["area"] == 25.0
    assert coco.dataset["info"] == {"description": "kept"}
    assert not list(out.parent.glob(".*.tmp"))


def test_validate_raises_when_nothing_usable(make_coco, tmp_path: Path) -> None:
    images, annotations = make_coco(2)
    for p in images.iterdir():
        truncate(p, keep=0.3)
    with pytest.raises(DataError, match="could be decoded"):
        validate_dataset(images, annotations, tmp_path / "out.json")
    images, annotations = make_coco(2, [ann(1, 1, [0, 0, 4, 4], category_id=3)])
    with pytest.raises(DataError, match="no usable annotations"):
        validate_dataset(images, annotations, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_split_is_seeded_disjoint_and_complete(make_coco, tmp_path: Path) -> None:
    _, annotations = make_coco(10, per_image=2)
    counts = split_dataset(annotations, 0.3, 7, tmp_path / "train.json", tmp_path / "val.json")
    assert counts == {"train_images": 7, "train_annotations": 14, "val_images": 3, "val_annotations": 6}
    train, val = COCO(str(tmp_path / "train.json")), COCO(str(tmp_path / "val.json"))
    assert set(train.getImgIds()).isdisjoint(val.getImgIds())
    assert sorted(train.getImgIds() + val.getImgIds()) == list(range(1, 11))
    for coco in (train, val):
        assert {a["image_id"] for a in coco.loadAnns(coco.getAnnIds())} == set(coco.getImgIds())
        assert coco.getCatIds() == [1, 2]
    again = tmp_path / "again"
    split_dataset(annotations, 0.3, 7, again / "train.json", again / "val.json")
    assert (again / "val.json").read_bytes() == (tmp_path / "val.json").read_bytes()


def test_split_seeds_give_different_splits(make_coco, tmp_path: Path) -> None:
    _, annotations = make_coco(12)
    splits = set()
    for seed in range(4):
        split_dataset(annotations, 0.25, seed, tmp_path / "t.json", tmp_path / "v.json")
        splits.add(tuple(i["id"] for i in json.loads((tmp_path / "v.json").read_text())["images"]))
    assert len(splits) > 1 and all(len(s) == 3 for s in splits)


def test_split_argument_errors(make_coco, tmp_path: Path) -> None:
    _, annotations = make_coco(1)
    with pytest.raises(ConfigError):
        split_dataset(annotations, 1.0, 0, tmp_path / "t.json", tmp_path / "v.json")
    with pytest.raises(DataError, match="at least 2"):
        split_dataset(annotations, 0.5, 0, tmp_path / "t.json", tmp_path / "v.json")
    with pytest.raises(DataError, match="not found"):
        split_dataset(tmp_path / "nope.json", 0.5, 0, tmp_path / "t.json", tmp_path / "v.json")


def test_fingerprint_is_stable_and_sensitive(make_coco, tmp_path: Path) -> None:
    images, annotations = make_coco(3)
    base = fingerprint(images, annotations)
    assert len(base) == 64 and base == fingerprint(str(images), str(annotations))

    # a copy elsewhere, with other timestamps and a hidden file, is the same dataset
    copy_images, copy_ann = tmp_path / "copy" / "imgs", tmp_path / "copy" / "ann.json"
    shutil.copytree(images, copy_images)
    shutil.copy(annotations, copy_ann)
    os.utime(copy_images / "000001.jpg", (1, 1))
    (copy_images / ".DS_Store").write_bytes(b"x")
    assert fingerprint(copy_images, copy_ann) == base

    copy_ann.write_text(copy_ann.read_text().replace('"a"', '"z"'))
    assert fingerprint(copy_images, copy_ann) != base
    shutil.copy(annotations, copy_ann)
    assert fingerprint(copy_images, copy_ann) == base

    changes = []
    write_image(copy_images / "000004.jpg", 8, 8)  # an added image
    changes.append(fingerprint(copy_images, copy_ann))
    (copy_images / "000004.jpg").rename(copy_images / "000005.jpg")  # a renamed one
    changes.append(fingerprint(copy_images, copy_ann))
    (copy_images / "000005.jpg").unlink()
    with (copy_images / "000001.jpg").open("ab") as f:  # a changed size
        f.write(b"\0")
    changes.append(fingerprint(copy_images, copy_ann))
    assert len({base, *changes}) == 4


def test_fingerprint_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="images folder not found"):
        fingerprint(tmp_path / "nope", tmp_path / "a.json")
    with pytest.raises(DataError, match="annotation file not found"):
        fingerprint(tmp_path, tmp_path / "a.json")


def test_validate_counts_images_the_dali_loader_would_skip(make_coco, tmp_path: Path, caplog) -> None:
    """A GIF decodes in the torch path (kept, not corrupt) but not in DALI: counted, with a warning."""
    from PIL import Image

    images, annotations = make_coco(3)
    Image.open(images / "000002.jpg").save(images / "000002.jpg", "GIF")  # the name keeps its suffix
    with caplog.at_level("WARNING", logger="retinaflow.data.validate"):
        report = validate_dataset(images, annotations, tmp_path / "out.json")
    assert report["dali_unreadable"] == 1 and report["corrupt_images"] == 0 and report["images"] == 3
    assert "1 image(s) decode here but the DALI loader would skip them (000002.jpg: GIF" in caplog.text
    assert "--loader torch" in caplog.text
    clean = validate_dataset(*make_coco(2), tmp_path / "out2.json")
    assert clean["dali_unreadable"] == 0
