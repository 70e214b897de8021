"""Catalogue: the detections (COCO results) files ``retinaflow eval`` accepts and refuses.

Accepted: a JSON list of ``{image_id, category_id, bbox [x, y, w, h], score}``, extra keys allowed
(``infer`` writes ``file_name``). Refused with one line: detections whose ``file_name`` disagrees with
the annotation file's image of the same id (made on other images: pairing them would be silent
nonsense).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from retinaflow.engine.evaluate import evaluate_detections
from retinaflow.errors import DataError

IMAGES = [{"id": i, "file_name": f"{i:03d}.jpg", "width": 100, "height": 100} for i in (1, 2, 3)]
ANNOTATIONS = [
    {"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
    for i in (1, 2, 3)
]


@pytest.fixture
def gt(tmp_path: Path) -> Path:
    path = tmp_path / "gt.json"
    doc = {"images": IMAGES, "annotations": ANNOTATIONS, "categories": [{"id": 1, "name": "a"}]}
    path.write_text(json.dumps(doc))
    return path


def _dets(**extra: Any) -> list[dict[str, Any]]:
    return [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9, **extra}
        for a in ANNOTATIONS
    ]


def test_extra_keys_and_matching_file_names_are_accepted(gt: Path) -> None:
    dets = _dets(extra="kept")
    for d in dets:
        d["file_name"] = f"{d['image_id']:03d}.jpg"
    assert evaluate_detections(gt, dets).map == pytest.approx(1.0)


def test_file_names_in_a_subfolder_match_by_name(gt: Path) -> None:
    dets = _dets()
    for d in dets:
        d["file_name"] = f"val/{d['image_id']:03d}.jpg"
    assert evaluate_detections(gt, dets).map == pytest.approx(1.0)


def test_detections_of_other_files_are_refused(gt: Path) -> None:
    """``infer`` on a bare folder numbers its images 1..N; those ids mean other files here."""
    dets = _dets()
    for d, name in zip(dets, ("zebra.jpg", "002.jpg", "apple.jpg"), strict=True):
        d["file_name"] = name
    with pytest.raises(
        DataError, match=r"2 of 3 image id\(s\).*id 1 is zebra.jpg in the detections but 001.jpg"
    ):
        evaluate_detections(gt, dets)


REFUSED = {
    "not a list": ({"annotations": []}, "must be a JSON list"),
    "an entry that is not an object": ([1, 2], "entry 0 is not a COCO result"),
    "an entry without bbox": ([{"image_id": 1, "category_id": 1, "score": 0.5}], "entry 0 is not"),
    "a bbox of 3 numbers": (
        [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}],
        "entry 0 is not",
    ),
    "a score that is text": (
        [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}],
        "entry 0 is not",
    ),
}


@pytest.mark.parametrize(("content", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_malformed_detections_are_one_clear_line(gt: Path, tmp_path: Path, content, message) -> None:
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message) as info:
        evaluate_detections(gt, path)
    assert "\n" not in str(info.value)


def test_detections_of_unknown_categories_are_counted_and_reported(gt: Path, caplog) -> None:
    dets = _dets() + [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5], "score": 0.5}] * 2
    with caplog.at_level("WARNING", logger="retinaflow.engine.evaluate"):
        result = evaluate_detections(gt, dets)
    assert result.map == pytest.approx(1.0)
    assert "2 detection(s) of category id(s) absent from" in caplog.text and "9" in caplog.text
