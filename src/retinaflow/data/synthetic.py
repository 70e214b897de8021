"""Deterministic synthetic detection dataset: coloured shapes on textured backgrounds, JPEG + COCO JSON.

Every image is drawn from its own random stream ``numpy.random.default_rng([seed, index])``, so the same
seed gives byte-identical files and the split does not change the pixels. Objects are filled shapes whose
class is their geometry (circle, square, triangle, star, cross, ring), with random colour, size (long side
uniform in 16–128 px by default, the range anchors of stride 8–128 cover), aspect, rotation (polygons) and
partial overlap. Backgrounds are flat, gradients, stripes or blotches under noise, plus clutter that is not an
object (thin lines, small dots) so that a detector must learn shapes rather than "anything not flat".

Layout under ``out``::

    train/000001.jpg ...          val/000161.jpg ...
    annotations/train.json        annotations/val.json      (COCO instances, category ids from 1)
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from retinaflow.errors import ConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
_FILE_RE = re.compile(r"^\d{6}\.jpg$")


@dataclass
class SynthConfig:
    """What to generate. ``image_size`` bounds each side independently; ``object_size`` bounds the long
    side of an object (further capped at 70 % of the image's short side)."""

    out: Path
    images: int = 200
    seed: int = 0
    val_fraction: float = 0.2
    image_size: tuple[int, int] = (192, 320)
    object_size: tuple[int, int] = (16, 128)
    objects_per_image: tuple[int, int] = (1, 6)
    classes: tuple[str, ...] = SHAPES
    jpeg_quality: int = 90
    # (width, height) choices, one drawn per image; empty: each side uniform in image_size. COCO_SIZES
    # gives the spread of sizes and aspect ratios of real photos (loader and shape-policy benchmarks).
    sizes: tuple[tuple[int, int], ...] = ()
    workers: int = 1  # processes drawing images (same bytes for any count)


# Common COCO image sizes (width, height): landscape, portrait, square and wide, small to large.
COCO_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (375, 500), (640, 360),
    (612, 612), (640, 640), (800, 600), (1024, 768), (768, 1024), (1280, 720),
)  # fmt: skip


@dataclass
class SynthPaths:
    """Where :func:`generate` wrote the two splits."""

    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path


def generate(cfg: SynthConfig) -> SynthPaths:
    """Write the dataset described by ``cfg`` and return its paths (same ``cfg`` → same bytes)."""
    _check(cfg)
    out = Path(cfg.out)
    paths = SynthPaths(
        out / "train", out / "annotations" / "train.json", out / "val", out / "annotations" / "val.json"
    )
    n_val = _val_count(cfg.images, cfg.val_fraction)
    n_train = cfg.images - n_val
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(cfg.classes)]
    for folder, ann_path, indices in (
        (paths.train_images, paths.train_annotations, range(n_train)),
        (paths.val_images, paths.val_annotations, range(n_train, cfg.images)),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for entry, objects in _write_images(cfg, folder, indices):
            images.append(entry)
            image_id = entry["id"]
            for label, (x1, y1, x2, y2), area in objects:
                bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": bbox,
                        "area": round(min(area, bbox[2] * bbox[3]), 2),
                        "iscrowd": 0,
                    }
                )
        _remove_stale(folder, {img["file_name"] for img in images})
        doc = {
            "info": {"description": "retinaflow synthetic shapes", "seed": cfg.seed, "version": "1"},
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        ann_path.write_text(json.dumps(doc, separators=(",", ":")))
    return paths


def _write_images(cfg: SynthConfig, folder: Path, indices: range) -> list[tuple[dict[str, Any], list[Any]]]:
    """Draw and save images ``indices`` (in ``cfg.workers`` processes); their COCO entries and objects."""
    job = functools.partial(_write_image, cfg, folder)
    if cfg.workers <= 1 or len(indices) < 2:
        return [job(i) for i in indices]
    with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
        return pool.map(job, indices, chunksize=16)


def _write_image(cfg: SynthConfig, folder: Path, index: int) -> tuple[dict[str, Any], list[Any]]:
    image_id = index + 1
    name = f"{image_id:06d}.jpg"
    pixels, objects = _draw_image(cfg, index)
    Image.fromarray(pixels).save(folder / name, "JPEG", quality=cfg.jpeg_quality)
    entry = {"id": image_id, "file_name": name, "width": pixels.shape[1], "height": pixels.shape[0]}
    return entry, objects


def _check(cfg: SynthConfig) -> None:
    if cfg.images < 1:
        raise ConfigError(f"synthetic dataset needs at least one image, got {cfg.images}")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    unknown = [c for c in cfg.classes if c not in SHAPES]
    if unknown or not cfg.classes or len(set(cfg.classes)) != len(cfg.classes):
        raise ConfigError(
            f"classes must be distinct names among {', '.join(SHAPES)}; got {list(cfg.classes)}"
        )
    lo, hi = cfg.image_size
    olo, ohi = cfg.object_size
    if not 32 <= lo <= hi:
        raise ConfigError(f"image_size must be (min, max) with 32 <= min <= max, got {cfg.image_size}")
    if not 4 <= olo <= ohi:
        raise ConfigError(f"object_size must be (min, max) with 4 <= min <= max, got {cfg.object_size}")
    if olo > 0.7 * lo:
        raise ConfigError(f"object_size min {olo} does not fit images of side {lo}")
    if not 1 <= cfg.objects_per_image[0] <= cfg.objects_per_image[1]:
        raise ConfigError(
            f"objects_per_image must be (min, max) with 1 <= min <= max, got {cfg.objects_per_image}"
        )


def _val_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete images of an earlier generation in our own naming pattern, so the folder matches the JSON."""
    for p in folder.iterdir():
        if _FILE_RE.match(p.name) and p.name not in keep:
            p.unlink()


# -- drawing -------------------------------------------------------------------------------------
Box = tuple[float, float, float, float]


def _draw_image(cfg: SynthConfig, index: int) -> tuple[np.ndarray, list[tuple[int, Box, float]]]:
    """One image: (H, W, 3) uint8 RGB and its objects as (label, x1y1x2y2 box in pixels, area)."""
    rng = np.random.default_rng([cfg.seed, index])
    if cfg.sizes:
        w, h = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
    else:
        h, w = (int(v) for v in rng.integers(cfg.image_size[0], cfg.image_size[1] + 1, size=2))
    background = _background(rng, h, w)
    canvas = Image.fromarray(background)
    draw = ImageDraw.Draw(canvas)
    _clutter(rng, draw, h, w)

    objects: list[tuple[int, Box, float]] = []
    wanted = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    long_hi = min(cfg.object_size[1], 0.7 * min(h, w))
    for _ in range(wanted * 8):
        if len(objects) == wanted:
            break
        label = int(rng.integers(len(cfg.classes)))
        # uniform in length (not log-uniform): learned faster with the same small-to-large range
        side = rng.uniform(cfg.object_size[0], long_hi)
        aspect = math.exp(rng.uniform(math.log(0.7), math.log(1 / 0.7)))
        bw, bh = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = (x1, y1, x1 + bw, y1 + bh)
        if any(_too_close(box, other) for _, other, _ in objects):
            continue
        colour = _object_colour(rng, background, box)
        area = _SHAPE_DRAWERS[cfg.classes[label]](draw, rng, box, colour)
        objects.append((label, box, area))

    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(3.0, 12.0))
    return np.clip(pixels, 0, 255).astype(np.uint8), objects


def _too_close(a: Box, b: Box) -> bool:
    """Some overlap is allowed, but neither object may lose more than 35 % of its box to the other."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return False
    inter = iw * ih
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter > 0.35 * smaller


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] → RGB float array in 0..255."""
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def _muted(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.85))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8: flat, gradient, stripes or blotches of muted colours (noise is added later)."""
    kind = int(rng.integers(4))
    base = _muted(rng)
    if kind == 0:
        img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    elif kind == 1:
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = base * (1 - t[..., None]) + _muted(rng) * t[..., None]
    elif kind == 2:
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 30)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
        img = base + rng.uniform(12, 35) * wave[..., None] * (_muted(rng) - 128) / 128
    else:
        gh, gw = (int(v) for v in rng.integers(3, 9, size=2))
        grid = np.stack([_muted(rng) for _ in range(gh * gw)]).reshape(gh, gw, 3).astype(np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, h: int, w: int) -> None:
    """Thin lines, polylines and small dots in any colour: texture a detector must learn to ignore."""
    for _ in range(int(rng.integers(3, 13))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = int(rng.integers(3))
        if kind == 0:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
            draw.line(pts, fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:
            x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
            pts = [(x, y)]
            for _ in range(int(rng.integers(2, 5))):
                x, y = x + float(rng.uniform(-40, 40)), y + float(rng.uniform(-40, 40))
                pts.append((x, y))
            draw.line(pts, fill=colour, width=1)
        else:
            x, y, r = float(rng.uniform(0, w)), float(rng.uniform(0, h)), float(rng.uniform(1, 3.5))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _object_colour(rng: np.random.Generator, background: np.ndarray, box: Box) -> tuple[int, int, int]:
    """A vivid colour (sometimes a dark one) far enough from the background under ``box``."""
    x1, y1, x2, y2 = (int(v) for v in box)
    local = background[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)].reshape(-1, 3).mean(axis=0)
    colour = np.zeros(3, dtype=np.float32)
    for _ in range(8):
        dark = rng.uniform() < 0.15
        colour = _hsv(
            rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.05, 0.25) if dark else rng.uniform(0.6, 1.0)
        )
        if float(np.linalg.norm(colour - local)) >= 90:
            break
    else:
        colour = np.zeros(3, np.float32) if local.mean() > 128 else np.full(3, 255, np.float32)
    r, g, b = (int(c) for c in colour)
    return r, g, b


def _fit(points: np.ndarray, box: Box) -> list[tuple[float, float]]:
    """Stretch a polygon (K, 2) so that its bounding box is exactly ``box``."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    unit = (points - lo) / (hi - lo)
    out = unit * np.array([box[2] - box[0], box[3] - box[1]]) + np.array([box[0], box[1]])
    return [(float(x), float(y)) for x, y in out]


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _polygon_area(pts: list[tuple[float, float]]) -> float:
    a = np.asarray(pts)
    x, y = a[:, 0], a[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


Colour = tuple[int, int, int]


def _circle(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: Box, colour: Colour) -> float:
    draw.ellipse(list(box), fill=colour)
    return math.pi * (box[2] - box[0]) * (box[3] - box[1]) / 4


def _square(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: Box, colour: Colour) -> float:
    draw.rectangle(list(box), fill=colour)
    return (box[2] - box[0]) * (box[3] - box[1])


def _polygon(points: np.ndarray, max_angle: float) -> Callable[..., float]:
    def draw_it(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: Box, colour: Colour) -> float:
        pts = _fit(_rotate(points, rng.uniform(-max_angle, max_angle)), box)
        draw.polygon(pts, fill=colour)
        return _polygon_area(pts)

    return draw_it


def _ring(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: Box, colour: Colour) -> float:
    w, h = box[2] - box[0], box[3] - box[1]
    t = max(2.0, rng.uniform(0.15, 0.25) * min(w, h))
    draw.ellipse(list(box), outline=colour, width=round(t))
    return math.pi / 4 * (w * h - max(w - 2 * t, 0) * max(h - 2 * t, 0))


def _star_points(k: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = np.arange(2 * k) * math.pi / k - math.pi / 2
    radii = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross_points(t: float = 0.34) -> np.ndarray:
    a, b = (1 - t) / 2, (1 + t) / 2
    return np.array(
        [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)],
        dtype=np.float64,
    )


_TRIANGLE = np.array([(0.0, -1.0), (math.cos(math.pi / 6), 0.5), (-math.cos(math.pi / 6), 0.5)])

_SHAPE_DRAWERS: dict[str, Callable[..., float]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _polygon(_TRIANGLE, math.pi),
    "star": _polygon(_star_points(), math.pi),
    "cross": _polygon(_cross_points(), math.pi / 9),
    "ring": _ring,
}
