"""Helpers for fp16/int8 engine tests: a checkpoint with confident detections, real images, matching.

The tests' tiny checkpoint scores every anchor near its 0.05 prior, so any rounding reorders its
detections; scaling its class logits' weights spreads the scores (0..1) and makes the confident
detections distinct, which is what an fp16/int8 engine can be held to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torchvision.ops import box_iou

from retinaflow.data.coco import CocoDataset
from retinaflow.data.transforms import EvalTransform


def sharpen(checkpoint: Path, out: Path, gain: float = 10.0) -> Path:
    """``checkpoint`` with its class logits' weights times ``gain``, saved as ``out``."""
    state = torch.load(checkpoint, weights_only=False)
    state["model"]["head.cls_logits.weight"] = state["model"]["head.cls_logits.weight"] * gain
    torch.save(state, out)
    return out


def val_batch(images: Path, annotations: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The images of a COCO set resized to fit ``side`` and padded to it: (B, 3, side, side) uint8 and
    their sizes (B, 2) int64 (height, width)."""
    ds = CocoDataset(images, annotations, EvalTransform(side, side), replace_corrupt=False)
    samples = [ds[i] for i in range(len(ds))]
    batch = np.zeros((len(samples), 3, side, side), dtype=np.uint8)
    sizes = np.zeros((len(samples), 2), dtype=np.int64)
    for i, s in enumerate(samples):
        h, w = s.image.shape[-2:]
        batch[i, :, :h, :w] = s.image.to(torch.uint8).numpy()
        sizes[i] = (h, w)
    return batch, sizes


def match(
    expected: list[np.ndarray], got: list[np.ndarray], min_score: float
) -> tuple[int, int, float, float]:
    """Match every expected detection scoring >= ``min_score`` with the best-overlapping detection of
    the same class in ``got`` (both ``num_detections, boxes, scores, classes``).

    Returns (expected detections, matched with IoU >= 0.9, largest score difference, smallest IoU) over
    the matched ones.
    """
    n_e, b_e, s_e, c_e = expected
    n_g, b_g, s_g, c_g = got
    total = hits = 0
    worst_score, worst_iou = 0.0, 1.0
    for i in range(len(n_e)):
        for j in range(int(n_e[i])):
            if s_e[i, j] < min_score:
                continue
            total += 1
            same = [k for k in range(int(n_g[i])) if c_g[i, k] == c_e[i, j]]
            if not same:
                continue
            iou = box_iou(torch.from_numpy(b_e[i, j : j + 1]), torch.from_numpy(b_g[i, same]))[0]
            k = int(iou.argmax())
            if float(iou[k]) >= 0.9:
                hits += 1
                worst_score = max(worst_score, abs(float(s_e[i, j] - s_g[i, same[k]])))
                worst_iou = min(worst_iou, float(iou[k]))
    return total, hits, worst_score, worst_iou


def compare_onnx(
    reference: Path, candidate: Path, images: Path, annotations: Path
) -> tuple[int, int, float, float]:
    """Run two end-to-end ONNX engines in ONNX Runtime (CPU) on the val images padded to 128 px and
    :func:`match` the candidate's detections scoring >= 0.4 against the reference's."""
    feed = dict(zip(("images", "sizes"), val_batch(images, annotations, 128), strict=True))
    ref, got = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)
        for p in (reference, candidate)
    )
    return match(ref, got, min_score=0.4)
