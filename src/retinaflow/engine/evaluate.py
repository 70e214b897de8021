"""COCO evaluation with pycocotools: the 12 summary statistics plus per-class AP."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from retinaflow.data.annotations import is_int, is_number, with_coco_defaults
from retinaflow.engine.callbacks import EvalResult
from retinaflow.errors import DataError

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {path} is not valid JSON: {exc}") from exc


def evaluate_detections(
    annotations: str | Path,
    detections: str | Path | list[dict[str, Any]],
    class_names: list[str] | None = None,
) -> EvalResult:
    """Run COCOeval (bbox) of ``detections`` against the ground truth in ``annotations``.

    detections: a COCO results list (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in original
    image pixels, ``score``) or the path of such a JSON file. Images of the ground truth without any
    detection count as misses; detections of images absent from the ground truth are an error.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path = Path(annotations)
    gt_data = _load_json(gt_path, "annotations")
    dets = _load_json(Path(detections), "detections") if isinstance(detections, (str, Path)) else detections
    if not isinstance(dets, list):
        raise DataError("detections must be a JSON list of COCO results")
    if not isinstance(gt_data, dict) or "images" not in gt_data or "categories" not in gt_data:
        raise DataError(f"annotations file {gt_path} is not COCO instances JSON (needs images, categories)")
    gt_data, left_out = with_coco_defaults(gt_data)
    if left_out:
        log.warning("%s: %d malformed annotation(s) left out of the evaluation", gt_path, left_out)
    image_ids = {img["id"] for img in gt_data["images"]}
    _check_results(dets)
    _check_images(dets, gt_data["images"], gt_path)
    _report_unknown_categories(dets, gt_data["categories"], gt_path)

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
    cat_ids = sorted(coco_gt.getCatIds())
    names = class_names or [coco_gt.cats[c]["name"] for c in cat_ids]
    if not dets:
        zero = dict.fromkeys(STAT_NAMES, 0.0)
        return EvalResult(stats=zero, per_class=dict.fromkeys(names, 0.0), num_images=len(image_ids))

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats, strict=True)}
    precision = ev.eval["precision"]  # (T iou, R recall, K classes, A areas, M maxdets)
    per_class: dict[str, float] = {}
    for k, name in enumerate(names[: precision.shape[2]]):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        per_class[name] = float(valid.mean()) if valid.size else float("nan")
    return EvalResult(
        stats=stats,
        per_class=per_class,
        num_images=len(image_ids),
        num_detections=len(dets),
        precision=np.asarray(precision),
    )


def _check_results(dets: list[Any]) -> None:
    """Raise :class:`DataError` naming the first entry that is not a COCO result."""
    for k, d in enumerate(dets):
        bbox = d.get("bbox") if isinstance(d, dict) else None
        ok = (
            isinstance(bbox, (list, tuple))
            and len(bbox) == 4
            and all(is_number(v) for v in bbox)
            and is_number(d.get("score"))
            and is_int(d.get("image_id"))
            and is_int(d.get("category_id"))
        )
        if not ok:
            raise DataError(
                f"detections entry {k} is not a COCO result (needs integer image_id and category_id, "
                f"bbox [x, y, w, h], numeric score): {json.dumps(d)[:120]}"
            )


def _report_unknown_categories(dets: list[dict[str, Any]], categories: list[Any], gt_path: Path) -> None:
    """COCOeval ignores detections of categories the ground truth lacks: count them and say so."""
    known = {c.get("id") for c in categories if isinstance(c, dict)}
    unknown = [d["category_id"] for d in dets if d["category_id"] not in known]
    if unknown:
        log.warning(
            "%d detection(s) of category id(s) absent from %s (%s) are not evaluated",
            len(unknown),
            gt_path,
            ", ".join(map(str, sorted(set(unknown))[:10])),
        )


def _check_images(dets: list[dict[str, Any]], images: list[dict[str, Any]], gt_path: Path) -> None:
    """Raise :class:`DataError` when detections refer to image ids absent from the ground truth, or
    name (``file_name``, written by ``infer``) other files than the ground truth's images of the same
    ids: ids alone would pair the wrong images. Names compare by their last component."""
    names = {img["id"]: PurePosixPath(str(img.get("file_name", ""))).name for img in images}
    unknown = {d.get("image_id") for d in dets} - names.keys()
    if unknown:
        raise DataError(
            f"detections refer to {len(unknown)} image id(s) absent from {gt_path}, "
            f"e.g. {sorted(map(str, unknown))[0]}"
        )
    theirs = {d["image_id"]: PurePosixPath(str(d["file_name"])).name for d in dets if "file_name" in d}
    wrong = sorted((i, name) for i, name in theirs.items() if name != names[i])
    if wrong:
        i, name = wrong[0]
        raise DataError(
            f"the detections were made on other images than {gt_path} describes: {len(wrong)} of "
            f"{len(theirs)} image id(s) name another file, e.g. id {i} is {name} in the detections but "
            f"{names[i]} in the annotations (run infer with --annotations {gt_path.name})"
        )


def report_dict(result: EvalResult) -> dict[str, Any]:
    """JSON-friendly report: stats, per-class AP, counts."""
    return {
        "stats": result.stats,
        "per_class_ap": {k: (None if v != v else v) for k, v in result.per_class.items()},
        "num_images": result.num_images,
        "num_detections": result.num_detections,
    }


def write_report(result: EvalResult, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report_dict(result), indent=2))
    return p


def render_table(result: EvalResult) -> str:
    """The summary and per-class AP as a plain-text table (rich), for the terminal."""
    from rich.console import Console
    from rich.table import Table

    summary = Table(title="COCO bbox evaluation")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for name in STAT_NAMES:
        summary.add_row(name, f"{result.stats[name]:.4f}")
    classes = Table(title="AP per class (IoU 0.50:0.95)")
    classes.add_column("class")
    classes.add_column("AP", justify="right")
    for name, ap in result.per_class.items():
        classes.add_row(name, "n/a" if ap != ap else f"{ap:.4f}")
    console = Console(file=io.StringIO(), width=100, force_terminal=False)
    console.print(summary)
    console.print(classes)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return str(out)
