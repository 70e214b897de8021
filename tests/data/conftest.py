"""Helpers for the data tests: tiny COCO datasets written on the fly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def write_image(path: Path, width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> None:
    """A random RGB image of the given size."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def ann(ann_id: int, image_id: int, bbox: list[float], category_id: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3] if len(bbox) == 4 else 0,
        "iscrowd": 0,
        **extra,
    }


class CocoFactory:
    """Writes ``n`` images (ids 1..n, ``000001.jpg``...) of size ``size`` and a COCO file around them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def __call__(
        self,
        n: int,
        annotations: list[dict[str, Any]] | None = None,
        size: tuple[int, int] = (40, 30),
        categories: list[dict[str, Any]] | None = None,
        per_image: int = 1,
    ) -> tuple[Path, Path]:
        """Returns (images folder, annotation file). Without ``annotations``, ``per_image`` boxes of
        category 1 are placed on each image."""
        self.count += 1
        base = self.root / f"ds{self.count}"
        images_dir = base / "images"
        w, h = size
        entries = []
        for i in range(1, n + 1):
            write_image(images_dir / f"{i:06d}.jpg", w, h, seed=i)
            entries.append({"id": i, "file_name": f"{i:06d}.jpg", "width": w, "height": h})
        if annotations is None:
            annotations = [
                ann((i - 1) * per_image + k + 1, i, [2.0 + k, 3.0, 10.0, 8.0], 1 + (i + k) % 2)
                for i in range(1, n + 1)
                for k in range(per_image)
            ]
        doc = {"images": entries, "annotations": annotations, "categories": categories or CATEGORIES}
        path = base / "instances.json"
        path.write_text(json.dumps(doc))
        return images_dir, path


@pytest.fixture
def make_coco(tmp_path: Path) -> CocoFactory:
    return CocoFactory(tmp_path)
