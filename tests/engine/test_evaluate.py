from __future__ import annotations

import json

import pytest

from retinaflow.engine.evaluate import (
    STAT_NAMES,
    evaluate_detections,
    render_table,
    report_dict,
    write_report,
)
from retinaflow.errors import DataError


@pytest.fixture
def gt(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 40, 20], "area": 800, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 60, 20, 30], "area": 600, "iscrowd": 0},
    ]
    cats = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, anns


def test_perfect_detections_score_one(gt):
    path, anns = gt
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in anns
    ]
    result = evaluate_detections(path, dets)
    assert set(result.stats) == set(STAT_NAMES)
    assert result.map == pytest.approx(1.0)
    assert result.per_class == {"circle": pytest.approx(1.0), "square": pytest.approx(1.0)}
    assert result.num_detections == 3 and result.num_images == 2


def test_missing_class_and_wrong_boxes_lower_the_score(gt):
    path, _ = gt
    dets = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 30], "score": 0.9}]
    dets.append({"image_id": 2, "category_id": 3, "bbox": [70, 0, 20, 20], "score": 0.8})
    result = evaluate_detections(path, dets)
    assert result.per_class["square"] == 0.0 or result.per_class["square"] != result.per_class["square"]
    assert 0.0 < result.per_class["circle"] < 1.0
    assert result.map < 0.5


def test_empty_detections_give_zeros_and_bad_inputs_fail(gt, tmp_path):
    path, _ = gt
    assert evaluate_detections(path, []).map == 0.0
    with pytest.raises(DataError, match="absent"):
        evaluate_detections(path, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(DataError, match="not found"):
        evaluate_detections(tmp_path / "none.json", [])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        evaluate_detections(bad, [])


def test_report_and_table(gt, tmp_path):
    path, anns = gt
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
        for a in anns
    ]
    result = evaluate_detections(path, dets)
    out = write_report(result, tmp_path / "r" / "report.json")
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report_dict(result)))
    assert data["stats"]["AP50"] == pytest.approx(1.0)
    table = render_table(result)
    assert "AP50" in table and "square" in table
