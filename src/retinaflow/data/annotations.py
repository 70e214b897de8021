"""Reading and checking COCO instances files: the entry-level rules :class:`CocoDataset` applies.

Each check returns what to keep or the kind of drop (a key of ``CocoDataset.report()``); nothing here
raises for a single bad entry, only for files that cannot be used at all (:class:`DataError`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TypeGuard

from retinaflow.errors import DataError


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: Why an ``images`` entry is refused: its count key (``CocoDataset.report()``) and a few words.
IMAGE_REFUSALS = {
    "invalid_image_entry": "entry is not an object",
    "invalid_image_id": "id is not an integer",
    "invalid_image_file_name": "file_name is missing or empty",
    "invalid_image_size": "width/height are not positive integers",
}


def integral(value: Any) -> int | None:
    """``value`` as an int when it is an integer or an integral float (``640.0``), else None."""
    if is_int(value):
        return value
    if is_number(value) and float(value).is_integer():
        return int(value)
    return None


def image_entry(entry: Any) -> tuple[int, str, int, int] | str:
    """(id, file_name, width, height) of a well-formed ``images`` entry, else the refusal kind (a key of
    :data:`IMAGE_REFUSALS`). Integral float sizes (``640.0``) are accepted; ids must be integers."""
    if not isinstance(entry, dict):
        return "invalid_image_entry"
    image_id, name = entry.get("id"), entry.get("file_name")
    w, h = integral(entry.get("width")), integral(entry.get("height"))
    if not is_int(image_id):
        return "invalid_image_id"
    if not (isinstance(name, str) and name):
        return "invalid_image_file_name"
    if w is None or h is None or w <= 0 or h <= 0:
        return "invalid_image_size"
    return image_id, name, w, h


def check_annotation(
    ann: Any,
    sizes: dict[int, tuple[int, int]],
    missing: set[int],
    cat_to_label: dict[int, int],
) -> tuple[str | None, tuple[float, float, float, float, int] | None]:
    """(drop kind, None) or (None, (x1, y1, x2, y2, clipped 0/1)) for one annotation entry."""
    if not isinstance(ann, dict):
        return "dropped_malformed", None
    image_id = ann.get("image_id")
    if not is_int(image_id):
        return "dropped_malformed", None
    if image_id in missing:
        return "dropped_missing_image", None
    if image_id not in sizes:
        return "dropped_unknown_image", None
    category = ann.get("category_id")
    if not is_int(category) or category not in cat_to_label:
        return "dropped_unknown_category", None
    if ann.get("iscrowd", 0):
        return "dropped_crowd", None
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        return "dropped_malformed", None
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
        return "dropped_degenerate", None
    w, h = sizes[image_id]
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if x2 <= x1 or y2 <= y1:
        return "dropped_outside", None
    clipped = int((x1, y1, x2, y2) != (x, y, x + bw, y + bh))
    return None, (x1, y1, x2, y2, clipped)


def with_coco_defaults(data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A copy of a COCO instances dict holding every key COCO tools (pycocotools) read, and the number
    of annotations left out.

    Filled as COCO tools assume: ``info`` {} and ``licenses`` [], annotation ``area`` from the box (w * h)
    and ``iscrowd`` 0, category ``name`` from the id. Annotations that training drops as malformed (not
    an object, no integer ``image_id`` or ``category_id``, no 4-number ``bbox``) are left out; they would
    crash the evaluation. The input is not modified.
    """
    kept = []
    for ann in data.get("annotations") or []:
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            continue
        if not (is_int(ann.get("image_id")) and is_int(ann.get("category_id"))):
            continue
        area = ann.get("area")
        kept.append(
            {
                **ann,
                "area": float(area) if is_number(area) else float(bbox[2]) * float(bbox[3]),
                "iscrowd": int(bool(ann.get("iscrowd", 0))),
            }
        )
    categories = [
        {**c, "name": str(c.get("name", c.get("id")))} if isinstance(c, dict) else c
        for c in data.get("categories") or []
    ]
    doc = {"info": {}, "licenses": [], **data, "annotations": kept, "categories": categories}
    return doc, len(data.get("annotations") or []) - len(kept)


def check_folder(images: str | Path) -> Path:
    """``images`` as a Path once it is known to be a readable local folder."""
    p = Path(images)
    if str(images).startswith("s3://"):
        raise DataError(f"{images}: s3:// paths must be fetched first (retinaflow.mlops.storage)")
    if not p.exists():
        raise DataError(f"images folder not found: {p}")
    if not p.is_dir():
        raise DataError(f"images path is not a folder: {p}")
    if not os.access(p, os.R_OK | os.X_OK):
        raise DataError(f"images folder is not readable: {p}")
    return p


def listing(folder: Path) -> set[str]:
    """Names of the files directly in ``folder`` (one directory scan instead of a stat per image)."""
    try:
        return {e.name for e in os.scandir(folder) if e.is_file()}
    except OSError as exc:
        raise DataError(f"cannot list images folder {folder}: {exc.strerror}") from exc


def load_annotations(path: Path) -> dict[str, Any]:
    """The annotation file as a dict with ``images``, ``annotations`` and ``categories`` lists."""
    if str(path).startswith("s3:/"):
        raise DataError(f"{path}: s3:// paths must be fetched first (retinaflow.mlops.storage)")
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    if path.is_dir():
        raise DataError(f"annotation path is a folder, expected a JSON file: {path}")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read annotation file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {path} is not valid JSON: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path} must hold a JSON object, got {type(data).__name__}")
    data.setdefault("annotations", [])  # image-info files (e.g. COCO test-dev) list no annotations
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"annotation file {path} has no {key!r} list")
    return data
