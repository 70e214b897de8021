"""Catalogue: the COCO entries retinaflow refuses, each counted under a kind that names its reason.

Images are refused as ``invalid_images`` with one ``invalid_image_<reason>`` count per reason; when
nothing is left, the error names the reasons. (Annotations: ``dropped_<reason>``, see test_coco.py.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from retinaflow.data.annotations import image_entry
from retinaflow.data.coco import CocoDataset
from retinaflow.errors import DataError

GOOD = {"id": 4, "file_name": "a.jpg", "width": 3, "height": 2}

REFUSED: dict[str, tuple[Any, str]] = {
    "string id": ({**GOOD, "id": "4"}, "invalid_image_id"),
    "no id": ({k: v for k, v in GOOD.items() if k != "id"}, "invalid_image_id"),
    "float id": ({**GOOD, "id": 4.0}, "invalid_image_id"),
    "empty file_name": ({**GOOD, "file_name": ""}, "invalid_image_file_name"),
    "no file_name": ({k: v for k, v in GOOD.items() if k != "file_name"}, "invalid_image_file_name"),
    "no height": ({k: v for k, v in GOOD.items() if k != "height"}, "invalid_image_size"),
    "zero width": ({**GOOD, "width": 0}, "invalid_image_size"),
    "fractional width": ({**GOOD, "width": 3.5}, "invalid_image_size"),
    "string width": ({**GOOD, "width": "3"}, "invalid_image_size"),
    "boolean height": ({**GOOD, "height": True}, "invalid_image_size"),
    "not an object": ([4, "a.jpg"], "invalid_image_entry"),
}


@pytest.mark.parametrize(("entry", "kind"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_image_entry_names_its_reason(entry: Any, kind: str) -> None:
    assert image_entry(entry) == kind


def test_accepted_image_entries() -> None:
    assert image_entry(GOOD) == (4, "a.jpg", 3, 2)
    assert image_entry({**GOOD, "width": 3.0, "height": 2.0}) == (4, "a.jpg", 3, 2)


def test_refusals_are_counted_per_reason(make_coco) -> None:
    images, annotations = make_coco(3)
    doc = json.loads(annotations.read_text())
    doc["images"][0]["id"] = "1"
    doc["images"][1]["width"] = 40.5
    annotations.write_text(json.dumps(doc))
    report = CocoDataset(images, annotations).report()
    assert report["images"] == 1 and report["invalid_images"] == 2
    assert report["invalid_image_id"] == 1 and report["invalid_image_size"] == 1


def test_no_usable_image_error_names_the_reasons(make_coco) -> None:
    images, annotations = make_coco(3)
    doc = json.loads(annotations.read_text())
    for image in doc["images"]:
        image["id"] = str(image["id"])
    annotations.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"3 invalid \(invalid_image_id 3: id is not an integer\)"):
        CocoDataset(images, annotations)
