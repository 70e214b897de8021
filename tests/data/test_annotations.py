from __future__ import annotations

import pytest

from retinaflow.data.annotations import check_annotation, check_folder
from retinaflow.errors import DataError

SIZES = {1: (40, 30)}  # image id -> (width, height)
CATS = {3: 0, 5: 1}  # category id -> label


def _check(**fields):
    entry = {"image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 5], "iscrowd": 0, **fields}
    return check_annotation(entry, SIZES, {2}, CATS)


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"image_id": "1"}, "dropped_malformed"),
        ({"image_id": 2}, "dropped_missing_image"),
        ({"image_id": 9}, "dropped_unknown_image"),
        ({"category_id": 4}, "dropped_unknown_category"),
        ({"category_id": [3]}, "dropped_unknown_category"),
        ({"iscrowd": 1}, "dropped_crowd"),
        ({"bbox": [1, 2, 10]}, "dropped_malformed"),
        ({"bbox": [1, 2, float("nan"), 5]}, "dropped_malformed"),
        ({"bbox": [1, 2, True, 5]}, "dropped_malformed"),
        ({"bbox": [1, 2, 0, 5]}, "dropped_degenerate"),
        ({"bbox": [1, 2, 10, -5]}, "dropped_degenerate"),
        ({"bbox": [40, 2, 10, 5]}, "dropped_outside"),
        ({"bbox": [-11, 2, 10, 5]}, "dropped_outside"),
    ],
)
def test_drop_kinds(fields, kind) -> None:
    assert _check(**fields) == (kind, None)


def test_kept_boxes_become_x1y1x2y2_and_clip() -> None:
    assert _check() == (None, (1.0, 2.0, 11.0, 7.0, 0))
    assert _check(bbox=[35, -2, 10, 5], category_id=5) == (None, (35.0, 0.0, 40.0, 3.0, 1))
    assert check_annotation("junk", SIZES, set(), CATS) == ("dropped_malformed", None)


def test_check_folder_refuses_remote_paths(tmp_path) -> None:
    assert check_folder(tmp_path) == tmp_path
    with pytest.raises(DataError, match="s3://"):
        check_folder("s3://bucket/images")
