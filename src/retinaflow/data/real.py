"""Deterministic detection dataset composed from real photographs: real objects on real backgrounds.

Each image is a random crop of a real texture or photo (:mod:`retinaflow.data.photos`), with unlabelled
real distractors (a flag, a helmet, a tripod, a horse silhouette, printed text...) and 1-5 instances of the
eight object classes pasted with their masks: random size (long side log-uniform, 24-160 px by default),
aspect, crop jitter, flip, colour (brightness, contrast, saturation, grayscale) and blur. Objects may
occlude one another, each keeping at least 55 % of its pixels; a box is the tight box of its visible
pixels. Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the same seed and packages
give the same bytes whatever the number of worker processes.

Layout under ``out`` (as :mod:`retinaflow.data.synthetic`)::

    train/000001.jpg ...    val/004001.jpg ...    annotations/train.json    annotations/val.json
"""

from __future__ import annotations

import json
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from retinaflow.data.photos import CLASSES, Crop, PhotoBank, load_bank
from retinaflow.data.synthetic import SynthPaths
from retinaflow.errors import ConfigError

MIN_VISIBLE = 0.55  # an occluded object keeps at least this share of its pixels


@dataclass
class RealConfig:
    """What to generate. ``image_size`` bounds each side; ``object_size`` the long side of an object
    (further capped at 75 % of the image's short side). ``workers``: processes (0 = this one)."""

    out: Path
    train_images: int = 4000
    val_images: int = 400
    seed: int = 0
    image_size: tuple[int, int] = (224, 352)
    object_size: tuple[int, int] = (24, 160)
    objects_per_image: tuple[int, int] = (1, 5)
    distractors: tuple[int, int] = (0, 2)
    jpeg_quality: int = 90
    workers: int = 0


Obj = tuple[int, list[float], int]  # label, [x, y, w, h] COCO box, visible pixel area

_BANK: PhotoBank | None = None  # set in the parent before forking workers


def generate(cfg: RealConfig) -> SynthPaths:
    """Write the dataset described by ``cfg``; returns its paths (same ``cfg`` and packages, same bytes)."""
    _check(cfg)
    global _BANK
    _BANK = load_bank()
    out = Path(cfg.out)
    paths = SynthPaths(
        out / "train", out / "annotations" / "train.json", out / "val", out / "annotations" / "val.json"
    )
    total = cfg.train_images + cfg.val_images
    splits = (
        (paths.train_images, paths.train_annotations, range(cfg.train_images)),
        (paths.val_images, paths.val_annotations, range(cfg.train_images, total)),
    )
    for folder, ann_path, indices in splits:
        folder.mkdir(parents=True, exist_ok=True)
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        jobs = [(cfg, folder, i) for i in indices]
        if cfg.workers > 0:
            with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
                results = pool.starmap(_write_image, jobs, chunksize=16)
        else:
            results = [_write_image(*job) for job in jobs]
        ann_path.write_text(json.dumps(_coco(cfg, results), separators=(",", ":")))
    return paths


def _check(cfg: RealConfig) -> None:
    if cfg.train_images < 1 or cfg.val_images < 0:
        raise ConfigError(
            f"need train_images >= 1 and val_images >= 0, got {cfg.train_images}, {cfg.val_images}"
        )
    lo, hi = cfg.image_size
    olo, ohi = cfg.object_size
    if not 64 <= lo <= hi:
        raise ConfigError(f"image_size must be (min, max) with 64 <= min <= max, got {cfg.image_size}")
    if not 8 <= olo <= ohi or olo > 0.75 * lo:
        raise ConfigError(f"object_size {cfg.object_size} must be (min, max), 8 <= min <= 0.75 * image min")
    if not 1 <= cfg.objects_per_image[0] <= cfg.objects_per_image[1]:
        raise ConfigError(
            f"objects_per_image must be (min, max) with 1 <= min <= max: {cfg.objects_per_image}"
        )
    if not 0 <= cfg.distractors[0] <= cfg.distractors[1]:
        raise ConfigError(f"distractors must be (min, max) with 0 <= min <= max: {cfg.distractors}")


def _coco(cfg: RealConfig, results: list[tuple[dict[str, Any], list[Obj]]]) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for image, objects in results:
        images.append(image)
        for label, bbox, area in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image["id"],
                    "category_id": label + 1,
                    "bbox": bbox,
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "retinaflow real-photo composites", "seed": cfg.seed, "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(CLASSES)],
    }


def _write_image(cfg: RealConfig, folder: Path, index: int) -> tuple[dict[str, Any], list[Obj]]:
    assert _BANK is not None
    pixels, objects = compose(_BANK, cfg, index)
    name = f"{index + 1:06d}.jpg"
    Image.fromarray(pixels).save(folder / name, "JPEG", quality=cfg.jpeg_quality)
    h, w = pixels.shape[:2]
    return {"id": index + 1, "file_name": name, "width": w, "height": h}, objects


def compose(bank: PhotoBank, cfg: RealConfig, index: int) -> tuple[np.ndarray, list[Obj]]:
    """Image ``index``: (H, W, 3) uint8 RGB and its objects as (label, COCO [x, y, w, h], visible area)."""
    rng = np.random.default_rng([cfg.seed, index])
    h, w = (int(v) // 16 * 16 for v in rng.integers(cfg.image_size[0], cfg.image_size[1] + 1, size=2))
    canvas = _background(bank, rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int16)  # which object each pixel shows (-1: none)
    for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
        crop = bank.distractors[int(rng.integers(len(bank.distractors)))]
        _paste(canvas, owner, _instance(crop, rng, _side(rng, 0.2 * min(h, w), 0.6 * min(h, w))), rng, -2)
    labels: list[int] = []
    areas: list[int] = []
    long_hi = min(cfg.object_size[1], 0.75 * min(h, w))
    for _ in range(int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))):
        label = int(rng.integers(len(CLASSES)))
        sources = bank.objects[CLASSES[label]]
        rgb, alpha = _instance(
            sources[int(rng.integers(len(sources)))], rng, _side(rng, cfg.object_size[0], long_hi)
        )
        for _attempt in range(5):
            before = canvas.copy(), owner.copy()
            area = _paste(canvas, owner, (rgb, alpha), rng, len(labels))
            visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(labels) + 1)
            if area > 0 and all(visible[k] >= MIN_VISIBLE * a for k, a in enumerate([*areas, area])):
                labels.append(label)
                areas.append(area)
                break
            canvas[...], owner[...] = before
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 6.0))
    pixels = np.clip(canvas + noise, 0, 255).astype(np.uint8)
    return pixels, _boxes(owner, labels)


def _boxes(owner: np.ndarray, labels: list[int]) -> list[Obj]:
    objects = []
    for k, label in enumerate(labels):
        ys, xs = np.nonzero(owner == k)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if min(x2 - x1, y2 - y1) >= 6:
            objects.append((label, [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], len(xs)))
    return objects


def _side(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Long side, log-uniform in [lo, hi]: as many small objects as large ones per octave."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(max(lo, hi)))))


def _background(bank: PhotoBank, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random crop of a random background, resized to (h, w), tinted if gray; (h, w, 3) float32."""
    src = bank.backgrounds[int(rng.integers(len(bank.backgrounds)))]
    sh, sw = src.shape[:2]
    scale = rng.uniform(0.35, 1.0) * min(sh / h, sw / w)
    ch, cw = max(8, round(h * scale)), max(8, round(w * scale))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    image = Image.fromarray(src[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BILINEAR)
    if rng.uniform() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32)
    tint = (
        rng.uniform(0.6, 1.2, size=3) if np.ptp(src[::16, ::16], axis=2).max() < 8 else rng.uniform(0.8, 1.2)
    )
    return np.ascontiguousarray(pixels * np.asarray(tint, dtype=np.float32))


def _instance(crop: Crop, rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    """One augmented instance of ``crop`` with long side ``side``: (h, w, 3) float32 RGB, (h, w) alpha."""
    x1, y1, x2, y2 = crop.box
    bw, bh = x2 - x1, y2 - y1
    jitter = rng.uniform(-0.05, 0.05, size=4) * np.array([bw, bh, bw, bh])
    ch, cw = crop.rgb.shape[:2]
    x1, y1 = max(0, round(x1 + jitter[0])), max(0, round(y1 + jitter[1]))
    x2, y2 = min(cw, round(x2 + jitter[2])), min(ch, round(y2 + jitter[3]))
    aspect = (x2 - x1) / (y2 - y1) * math.exp(rng.uniform(-0.2, 0.2))
    tw, th = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    grow = max(1.0, 10 / min(tw, th))  # thin objects (the rocket) keep a short side of >= 10 px
    size = (round(tw * grow), round(th * grow))
    rgb = Image.fromarray(crop.rgb[y1:y2, x1:x2]).resize(size, Image.Resampling.BILINEAR)
    if rng.uniform() < 0.25:
        rgb = rgb.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    if crop.alpha is not None:
        mask = Image.fromarray((crop.alpha[y1:y2, x1:x2] * 255).astype(np.uint8)).resize(
            size, Image.Resampling.BILINEAR
        )
        alpha = np.asarray(mask, dtype=np.float32) / 255
    else:
        alpha = _shape_alpha(crop.shape, size[1], size[0])
    pixels = _colour(np.asarray(rgb, dtype=np.float32), rng)
    if rng.uniform() < 0.5:
        pixels, alpha = pixels[:, ::-1], alpha[:, ::-1]
    return np.ascontiguousarray(pixels), np.ascontiguousarray(alpha)


def _shape_alpha(shape: str, h: int, w: int) -> np.ndarray:
    """Soft-edged (1.5 px) ellipse or rectangle filling an (h, w) box."""
    ys = (np.arange(h, dtype=np.float32) + 0.5 - h / 2)[:, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5 - w / 2)[None, :]
    if shape == "ellipse":
        r = np.sqrt((xs / (w / 2)) ** 2 + (ys / (h / 2)) ** 2)
        return np.clip((1 - r) * min(h, w) / 3 + 0.5, 0, 1)
    edge = np.minimum(w / 2 - np.abs(xs), h / 2 - np.abs(ys))
    return np.clip(edge / 1.5, 0, 1)


def _colour(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors in [0.7, 1.3]; grayscale one time in ten."""
    gray = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pixels = gray[..., None] + (pixels - gray[..., None]) * np.float32(rng.uniform(0.7, 1.3))
    if rng.uniform() < 0.1:
        pixels = np.repeat(gray[..., None], 3, axis=2)
    mean = pixels.mean()
    pixels = mean + (pixels - mean) * np.float32(rng.uniform(0.7, 1.3))
    return np.clip(pixels * np.float32(rng.uniform(0.7, 1.3)), 0, 255)


def _paste(
    canvas: np.ndarray,
    owner: np.ndarray,
    obj: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    k: int,
) -> int:
    """Alpha-blend ``obj`` at a random position inside ``canvas``; pixels with alpha > 0.5 now show ``k``.

    Returns that pixel count (the object's full area). ``obj`` larger than the canvas is clipped.
    """
    rgb, alpha = obj
    h, w = owner.shape
    oh, ow = min(alpha.shape[0], h), min(alpha.shape[1], w)
    rgb, alpha = rgb[:oh, :ow], alpha[:oh, :ow]
    y, x = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
    region = canvas[y : y + oh, x : x + ow]
    region += (rgb - region) * alpha[..., None]
    solid = alpha > 0.5
    owner[y : y + oh, x : x + ow][solid] = k
    return int(solid.sum())
