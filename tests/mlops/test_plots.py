"""Precision-recall curves and sample-detection grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinaflow.errors import DataError
from retinaflow.mlops import plots


def _precision(k: int = 3) -> np.ndarray:
    """COCOeval-shaped (10, 101, K, 4, 3): class 0 perfect, class 1 decaying, class 2 without ground truth."""
    p = np.full((10, 101, k, 4, 3), -1.0)
    p[:, :, 0] = 1.0
    p[:, :, 1] = np.linspace(1.0, 0.0, 101)[None, :, None, None]
    p[5:, 60:, 1] = 0.0
    return p


def test_pr_curves_plots_classes_with_ground_truth(tmp_path: Path) -> None:
    fig = plots.pr_curves(_precision(), ["cat", "dog", "bird"])
    ax = fig.axes[0]
    assert len(ax.lines) == 4  # 2 classes x (IoU .50, mean over IoUs)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("cat (AP 1.000)") and labels[1].startswith("dog")
    assert not any("bird" in label for label in labels)
    solid = ax.lines[2].get_ydata()  # dog at IoU .50: the linear ramp
    np.testing.assert_allclose(solid, np.linspace(1.0, 0.0, 101))
    dashed = ax.lines[3].get_ydata()  # mean over 10 IoUs: half of them zeroed from recall 0.60 on
    np.testing.assert_allclose(dashed[60:], np.linspace(1.0, 0.0, 101)[60:] / 2)
    out = plots.save_figure(fig, tmp_path / "pr" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pr_curves_rejects_wrong_shape() -> None:
    with pytest.raises(DataError, match="101"):
        plots.pr_curves(np.zeros((10, 50, 2, 4, 3)), ["a", "b"])


def _dataset(tmp_path: Path) -> tuple[Path, dict, list[dict]]:
    images = tmp_path / "images"
    images.mkdir()
    gt = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "square"}]}
    dets = []
    for i in range(1, 4):
        Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(images / f"im{i}.png")
        gt["images"].append({"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48})
        gt["annotations"].append(
            {"id": i, "image_id": i, "category_id": 7, "bbox": [10, 5, 20, 30], "area": 600}
        )
        dets.append({"image_id": i, "category_id": 7, "bbox": [11, 6, 20, 30], "score": 0.9})
        dets.append({"image_id": i, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.1})
    return images, gt, dets


def test_samples_from_coco_converts_boxes(tmp_path: Path) -> None:
    images, gt, dets = _dataset(tmp_path)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    samples = plots.samples_from_coco(images, tmp_path / "gt.json", dets, count=2, seed=1)
    assert len(samples) == 2
    assert [s.title for s in samples] == sorted(s.title for s in samples)
    s = samples[0]
    assert s.image.shape == (48, 64, 3) and s.image.dtype == np.uint8
    np.testing.assert_allclose(s.gt_boxes, [[10, 5, 30, 35]])
    np.testing.assert_allclose(s.pred_boxes[0], [11, 6, 31, 36])
    assert s.pred_names == ["square", "square"] and s.gt_names == ["square"]
    assert list(s.pred_scores) == pytest.approx([0.9, 0.1])


def test_samples_from_coco_categories_without_name(tmp_path: Path) -> None:
    """``eval --mlflow`` draws samples from any accepted COCO file: a nameless category is its id."""
    images, gt, dets = _dataset(tmp_path)
    del gt["categories"][0]["name"]
    samples = plots.samples_from_coco(images, gt, dets, count=1)
    assert samples[0].gt_names == ["7"] and samples[0].pred_names == ["7", "7"]


def test_detection_grid_draws_true_and_confident_boxes(tmp_path: Path) -> None:
    images, gt, dets = _dataset(tmp_path)
    samples = plots.samples_from_coco(images, gt, dets, count=3)
    fig = plots.detection_grid(samples, score_thresh=0.3, cols=2)
    axes = [a for a in fig.axes if a.images]
    assert len(axes) == 3
    for ax in axes:
        colours = sorted(tuple(p.get_edgecolor()) for p in ax.patches)
        assert len(colours) == 2  # one true box, one prediction above 0.3 (the 0.1 one is hidden)
        assert [t.get_text() for t in ax.texts] == ["square", "square 0.90"]
    assert plots.save_figure(fig, tmp_path / "grid.png").stat().st_size > 1000


def test_detection_grid_needs_samples() -> None:
    with pytest.raises(DataError):
        plots.detection_grid([])
