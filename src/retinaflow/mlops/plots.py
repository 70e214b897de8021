"""Plots people would rather look at than read: per-class precision-recall curves and a grid of sample
images with predicted and true boxes. Pure matplotlib (``Figure`` objects, no pyplot global state, no
display needed)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from retinaflow.errors import DataError

RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCOeval's recall thresholds (R axis)


@dataclass
class Sample:
    """One image with its boxes, all in original image pixels.

    image: (H, W, 3) uint8 RGB; pred_boxes: (N, 4) float x1y1x2y2; pred_scores: (N,) float;
    pred_names / gt_names: class name per box; gt_boxes: (M, 4) float x1y1x2y2.
    """

    image: np.ndarray
    title: str = ""
    pred_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    pred_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    pred_names: list[str] = field(default_factory=list)
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    gt_names: list[str] = field(default_factory=list)


def pr_curves(precision: Any, class_names: Sequence[str], max_classes: int = 20) -> Figure:
    """Precision-recall curves per class from COCOeval's raw ``eval['precision']``.

    precision: (T, R, K, A, M) array (IoU thresholds .50:.05:.95, 101 recall points, classes, area
    ranges, max-dets), -1 where undefined. Plots area "all" and the largest max-det; per class one solid
    curve at IoU 0.50 and one dashed curve averaged over IoU 0.50:0.95. Classes without ground truth
    (all -1) are left out; at most ``max_classes`` (highest AP first).
    """
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim != 5 or p.shape[1] != len(RECALL_POINTS):
        raise DataError(f"precision must be COCOeval's (T, 101, K, A, M) array, got shape {p.shape}")
    curves = p[:, :, :, 0, -1]  # (T, R, K)
    rows = []
    for k in range(curves.shape[2]):
        c = curves[:, :, k]
        if (c < 0).all():
            continue
        valid = c >= 0
        at50 = np.where(valid[0], c[0], 0.0)
        count = valid.sum(axis=0)
        mean = np.where(count > 0, (c * valid).sum(axis=0) / np.maximum(count, 1), 0.0)
        name = class_names[k] if k < len(class_names) else f"class {k}"
        rows.append((float(c[valid].mean()), name, at50, mean))
    rows.sort(key=lambda r: -r[0])
    rows = rows[:max_classes]
    fig = Figure(figsize=(8, 6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(rows))]
    for (ap, name, at50, mean), colour in zip(rows, colours, strict=True):
        ax.plot(RECALL_POINTS, at50, color=colour, label=f"{name} (AP {ap:.3f})")
        ax.plot(RECALL_POINTS, mean, color=colour, linestyle="--", linewidth=0.8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall per class (solid: IoU 0.50, dashed: mean over IoU 0.50:0.95)")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center")
    return fig


def detection_grid(samples: Sequence[Sample], score_thresh: float = 0.3, cols: int = 4) -> Figure:
    """A grid of images: true boxes in green, predicted boxes (score >= ``score_thresh``) in red with
    ``name score`` labels."""
    if not samples:
        raise DataError("detection_grid needs at least one sample")
    cols = max(1, min(cols, len(samples)))
    rows = (len(samples) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 4 * rows), dpi=100)
    for i, s in enumerate(samples):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(s.image)
        ax.set_axis_off()
        ax.set_title(s.title, fontsize=8)
        for box, name in zip(np.asarray(s.gt_boxes).reshape(-1, 4), s.gt_names, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.5))
            ax.text(x1, y2, name, color="black", fontsize=6, va="top", bbox=_label_box("lime"))
        keep = np.asarray(s.pred_scores).reshape(-1) >= score_thresh
        boxes = np.asarray(s.pred_boxes).reshape(-1, 4)[keep]
        scores = np.asarray(s.pred_scores).reshape(-1)[keep]
        names = [n for n, k in zip(s.pred_names, keep, strict=True) if k]
        for box, score, name in zip(boxes, scores, names, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1.0))
            ax.text(
                x1,
                y1,
                f"{name} {score:.2f}",
                color="white",
                fontsize=6,
                va="bottom",
                bbox=_label_box("red"),
            )
    fig.suptitle("green: ground truth, red: predictions", fontsize=10)
    fig.tight_layout()
    return fig


def _label_box(colour: str) -> dict[str, Any]:
    return {"facecolor": colour, "alpha": 0.6, "pad": 1, "linewidth": 0}


def _xywh_to_xyxy(boxes: list[list[float]]) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def choose_images(gt: dict[str, Any], count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` image entries of a COCO ground truth, picked deterministically by ``seed``, in id order."""
    images = list(gt.get("images", []))
    if not images:
        raise DataError("the annotations hold no images to sample")
    chosen = random.Random(seed).sample(images, min(count, len(images)))
    return sorted(chosen, key=lambda im: im["id"])


def samples_from_coco(
    images_dir: str | Path,
    annotations: str | Path | dict[str, Any],
    detections: str | Path | list[dict[str, Any]],
    count: int = 8,
    seed: int = 0,
) -> list[Sample]:
    """Pick ``count`` images of a COCO ground truth (deterministically, by ``seed``) and pair them with
    their ground-truth boxes and the detections (COCO results, ``bbox`` [x, y, w, h]) of those images."""
    from PIL import Image

    gt = json.loads(Path(annotations).read_text()) if not isinstance(annotations, dict) else annotations
    dets = json.loads(Path(detections).read_text()) if not isinstance(detections, list) else detections
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt.get("categories", [])}
    chosen = choose_images(gt, count, seed)
    by_image_gt: dict[Any, list[dict[str, Any]]] = {}
    for a in gt.get("annotations", []):
        by_image_gt.setdefault(a["image_id"], []).append(a)
    by_image_dt: dict[Any, list[dict[str, Any]]] = {}
    for d in dets:
        by_image_dt.setdefault(d["image_id"], []).append(d)
    out = []
    for im in chosen:
        path = Path(images_dir) / im["file_name"]
        try:
            with Image.open(path) as pil:
                array = np.asarray(pil.convert("RGB"))
        except OSError as exc:
            raise DataError(f"cannot read sample image {path}: {exc}") from exc
        g = by_image_gt.get(im["id"], [])
        d = sorted(by_image_dt.get(im["id"], []), key=lambda r: -r["score"])
        out.append(
            Sample(
                image=array,
                title=str(im["file_name"]),
                pred_boxes=_xywh_to_xyxy([r["bbox"] for r in d]),
                pred_scores=np.asarray([r["score"] for r in d], dtype=np.float32),
                pred_names=[names.get(r["category_id"], str(r["category_id"])) for r in d],
                gt_boxes=_xywh_to_xyxy([a["bbox"] for a in g]),
                gt_names=[names.get(a["category_id"], str(a["category_id"])) for a in g],
            )
        )
    return out


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (parents created) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p
