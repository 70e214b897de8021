"""Catalogue: the COCO instances files retinaflow accepts, for training and for evaluation alike.

Every variant here is a valid COCO file (or one that COCO tools read) that some labelling tool writes.
Each must load for training with all its boxes, and evaluate (``retinaflow eval``, ``infer
--annotations``, validation during training) to AP 1.0 against its own boxes as detections. The
pycocotools versions the project allows differ in which keys they read (2.0.10's ``loadRes`` reads
``info``); the fixture below makes the strictest behaviour the norm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pycocotools.coco import COCO

from retinaflow.data.coco import CocoDataset
from retinaflow.engine.evaluate import evaluate_detections

Doc = dict[str, Any]


@pytest.fixture(autouse=True)
def strict_pycocotools(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycocotools 2.0.10's ``loadRes`` copies ``dataset['info']`` (KeyError when absent)."""
    original = COCO.loadRes

    def load_res(self: COCO, res: Any) -> COCO:
        self.dataset["info"]  # the read that raises in 2.0.10
        return original(self, res)

    monkeypatch.setattr(COCO, "loadRes", load_res)


def _drop(section: str, key: str) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        for entry in doc[section]:
            entry.pop(key, None)

    return change


def _with_info_and_licenses(doc: Doc) -> None:
    doc["info"] = {"description": "test", "version": "1.0", "year": 2026}
    doc["licenses"] = [{"id": 1, "name": "CC-BY", "url": "https://example.com"}]
    for image in doc["images"]:
        image["license"] = 1


def _extra_keys(doc: Doc) -> None:
    doc["tool"] = {"name": "labeller", "version": 3}
    for image in doc["images"]:
        image.update(coco_url="", date_captured="2026-01-01", flickr_url="")
    for a in doc["annotations"]:
        a.update(segmentation=[[0, 0, 1, 0, 1, 1]], attributes={"occluded": False})
    for c in doc["categories"]:
        c["supercategory"] = "thing"


def _float_sizes(doc: Doc) -> None:
    for image in doc["images"]:
        image.update(width=float(image["width"]), height=float(image["height"]))


VARIANTS: dict[str, Callable[[Doc], None]] = {
    "minimal: no info, no licenses": lambda doc: None,
    "info and licenses": _with_info_and_licenses,
    "extra keys everywhere": _extra_keys,
    "annotations without area": _drop("annotations", "area"),
    "annotations without iscrowd": _drop("annotations", "iscrowd"),
    "categories without name": _drop("categories", "name"),
    "integral float width and height (640.0)": _float_sizes,
}


@pytest.mark.parametrize("change", VARIANTS.values(), ids=VARIANTS.keys())
def test_variant_trains_and_evaluates(make_coco, change: Callable[[Doc], None]) -> None:
    images, annotations = make_coco(3, per_image=2)
    doc = json.loads(annotations.read_text())
    change(doc)
    annotations.write_text(json.dumps(doc))
    dataset = CocoDataset(images, annotations)
    assert len(dataset) == 3 and dataset.report()["annotations"] == 6
    result = evaluate_detections(annotations, _perfect_detections(doc))
    assert result.map == pytest.approx(1.0)
    assert len(result.per_class) == 2


def test_category_names_default_to_the_id(make_coco) -> None:
    images, annotations = make_coco(2)
    doc = json.loads(annotations.read_text())
    _drop("categories", "name")(doc)
    annotations.write_text(json.dumps(doc))
    assert CocoDataset(images, annotations).class_names == ["1", "2"]
    assert list(evaluate_detections(annotations, _perfect_detections(doc)).per_class) == ["1", "2"]


def _perfect_detections(doc: Doc) -> list[dict[str, Any]]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in doc["annotations"]
    ]


def test_evaluation_does_not_change_the_file(make_coco) -> None:
    _, annotations = make_coco(2)
    before = annotations.read_bytes()
    evaluate_detections(Path(annotations), [])
    assert annotations.read_bytes() == before
