from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from retinaflow.data.coco import CocoDataset
from retinaflow.errors import DataError

from .conftest import CATEGORIES, ann, truncate, write_image


def _rewrite(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


# -- unreadable inputs ---------------------------------------------------------------------------
def test_missing_images_folder(make_coco, tmp_path: Path) -> None:
    _, annotations = make_coco(2)
    with pytest.raises(DataError, match="images folder not found"):
        CocoDataset(tmp_path / "nope", annotations)
    with pytest.raises(DataError, match="not a folder"):
        CocoDataset(annotations, annotations)


def test_missing_or_folder_annotation_path(make_coco, tmp_path: Path) -> None:
    images, _ = make_coco(2)
    with pytest.raises(DataError, match="annotation file not found"):
        CocoDataset(images, tmp_path / "missing.json")
    with pytest.raises(DataError, match="is a folder"):
        CocoDataset(images, images)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"images": [], "categories": {}}', "no 'categories' list"),
        ('{"annotations": [], "categories": []}', "no 'images' list"),
    ],
)
def test_invalid_json_is_one_line_data_error(make_coco, content, message) -> None:
    images, annotations = make_coco(1)
    if isinstance(content, bytes):
        annotations.write_bytes(content)
    else:
        annotations.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        CocoDataset(images, annotations)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        ([], "no categories"),
        ([{"name": "x"}], "without an integer id"),
        ([{"id": 1}, {"id": 1}], "listed twice"),
    ],
)
def test_bad_categories(make_coco, categories, message) -> None:
    images, annotations = make_coco(1)
    _rewrite(annotations, categories=categories)
    with pytest.raises(DataError, match=message):
        CocoDataset(images, annotations)


# -- cleaning with counts ------------------------------------------------------------------------
def test_each_bad_annotation_kind_is_dropped_and_counted(make_coco) -> None:
    anns = [
        ann(1, 1, [1, 1, 10, 10]),  # good
        ann(2, 1, [1, 1, 10, 10], category_id=9),  # unknown category
        ann(3, 1, [50, 40, 5, 5]),  # entirely outside a 40x30 image
        ann(4, 1, [-20, 5, 10, 10]),  # entirely outside, to the left
        ann(5, 1, [1, 1, 0, 10]),  # zero width
        ann(6, 1, [1, 1, 10, -3]),  # negative height
        ann(7, 1, [1, 1, 10, 10], iscrowd=1),  # crowd
        ann(8, 1, [1, 1, 10], category_id=2),  # malformed bbox
        ann(9, 7, [1, 1, 10, 10]),  # unknown image
        ann(10, 2, [30, 20, 20, 20], category_id=2),  # partly outside: clipped to (30, 20, 40, 30)
        ann(11, 2, [1, 1, 4, 4], category_id="1"),  # category id of the wrong type
    ]
    images, annotations = make_coco(2, anns)
    ds = CocoDataset(images, annotations)
    r = ds.report()
    assert r["annotations_listed"] == 11 and r["annotations"] == 2
    expected = {
        "dropped_unknown_category": 2,
        "dropped_outside": 2,
        "dropped_degenerate": 2,
        "dropped_crowd": 1,
        "dropped_malformed": 1,
        "dropped_unknown_image": 1,
        "clipped": 1,
    }
    assert {k: r[k] for k in expected} == expected
    boxes, labels = ds.targets(1)
    np.testing.assert_allclose(boxes, [[30, 20, 40, 30]])
    assert labels.tolist() == [1]
    boxes, labels = ds.targets(0)
    np.testing.assert_allclose(boxes, [[1, 1, 11, 11]])
    assert labels.tolist() == [0]


def test_category_ids_map_to_sorted_contiguous_labels(make_coco) -> None:
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 11, "name": "eleven"}]
    anns = [ann(1, 1, [0, 0, 5, 5], 11), ann(2, 1, [0, 0, 6, 6], 3), ann(3, 1, [0, 0, 7, 7], 7)]
    images, annotations = make_coco(1, anns, categories=cats)
    ds = CocoDataset(images, annotations)
    assert ds.class_names == ["three", "seven", "eleven"]
    assert ds.category_ids == [3, 7, 11]
    assert ds.targets(0)[1].tolist() == [2, 0, 1]
    sample = ds[0]
    assert sample.labels.dtype == torch.int64 and sample.labels.tolist() == [2, 0, 1]
    assert (
        sample.image is not None and sample.image.shape == (3, 30, 40) and sample.image.dtype == torch.uint8
    )


def test_missing_image_files_are_counted_and_skipped(make_coco) -> None:
    images, annotations = make_coco(4, per_image=2)
    (images / "000002.jpg").unlink()
    (images / "000004.jpg").unlink()
    ds = CocoDataset(images, annotations)
    r = ds.report()
    assert len(ds) == 2 and ds.image_ids == [1, 3]
    assert r["missing_files"] == 2 and r["dropped_missing_image"] == 4 and r["annotations"] == 4


def test_invalid_and_duplicate_image_entries(make_coco) -> None:
    images, annotations = make_coco(2)
    doc = json.loads(annotations.read_text())
    doc["images"] += [
        doc["images"][0],
        {"id": 5, "file_name": "x.jpg"},
        "junk",
        {**doc["images"][1], "id": 6, "width": 0},
    ]
    annotations.write_text(json.dumps(doc))
    r = CocoDataset(images, annotations).report()
    assert r["images_listed"] == 6 and r["images"] == 2
    assert r["duplicate_images"] == 1 and r["invalid_images"] == 3


def test_dataset_empty_after_cleaning_raises(make_coco) -> None:
    images, annotations = make_coco(2, [ann(1, 1, [0, 0, 5, 5], 9), ann(2, 2, [0, 0, 0, 5])])
    with pytest.raises(DataError, match="no usable annotations") as info:
        CocoDataset(images, annotations)
    assert "dropped_unknown_category" in str(info.value)
    # an image-info file without annotations is fine where annotations are not required (inference)
    ds = CocoDataset(images, annotations, require_annotations=False)
    assert len(ds) == 2 and ds.report()["images_without_annotations"] == 2

    for p in images.iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no usable images"):
        CocoDataset(images, annotations, require_annotations=False)


def test_image_info_file_without_annotations_key(make_coco) -> None:
    images, annotations = make_coco(2)
    doc = json.loads(annotations.read_text())
    del doc["annotations"]
    annotations.write_text(json.dumps(doc))
    assert len(CocoDataset(images, annotations, require_annotations=False)) == 2


# -- decoding ------------------------------------------------------------------------------------
def test_corrupt_image_replaced_in_training_and_reported(make_coco, caplog) -> None:
    images, annotations = make_coco(3)
    truncate(images / "000002.jpg")
    ds = CocoDataset(images, annotations, replace_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="retinaflow.data.coco"):
        sample = ds[1]
    assert sample.image is not None and sample.image_id == 3 and sample.skipped == (2,)
    assert ds.report()["corrupt_images"] == 1
    assert "corrupt image" in caplog.text and "000002.jpg" in caplog.text
    # the last image wraps around to the first
    (images / "000003.jpg").write_bytes(b"not an image at all")
    sample = ds[2]
    assert sample.image_id == 1 and sample.skipped == (3,)
    assert ds.report()["corrupt_images"] == 2


def test_corrupt_image_returned_empty_in_evaluation(make_coco) -> None:
    images, annotations = make_coco(2)
    truncate(images / "000001.jpg", keep=0.3)
    ds = CocoDataset(images, annotations, replace_corrupt=False)
    sample = ds[0]
    assert sample.image is None and sample.image_id == 1 and sample.skipped == (1,)
    assert ds[1].image is not None


def test_all_images_corrupt_raises(make_coco) -> None:
    images, annotations = make_coco(2)
    for p in images.iterdir():
        truncate(p, keep=0.2)
    with pytest.raises(DataError, match="could be decoded"):
        CocoDataset(images, annotations)[0]


def test_pil_fallback_for_formats_torchvision_does_not_read(make_coco) -> None:
    images, annotations = make_coco(1)
    write_image(images / "000001.jpg", 40, 30, seed=1, fmt="BMP")  # BMP bytes under a .jpg name
    ds = CocoDataset(images, annotations)
    image = ds.decode(0)
    expected = np.random.default_rng(1).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    assert image is not None and torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_boxes_clipped_to_decoded_size_when_json_size_is_wrong(make_coco) -> None:
    images, annotations = make_coco(1, [ann(1, 1, [20, 10, 60, 40])], size=(40, 30))
    doc = json.loads(annotations.read_text())
    doc["images"][0].update(width=100, height=80)
    annotations.write_text(json.dumps(doc))
    sample = CocoDataset(images, annotations)[0]
    assert sample.boxes.tolist() == [[20.0, 10.0, 40.0, 30.0]]


def test_categories_constant_is_used() -> None:
    assert [c["id"] for c in CATEGORIES] == [1, 2]
