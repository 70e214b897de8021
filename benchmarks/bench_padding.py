"""Padded pixels per training image under each shape policy: the work a GPU does on padding (CPU only).

The training sampler (``data.sampler.train_batches``, the one both loaders use) draws batches from COCO's
spread of image sizes (``data.synthetic.COCO_SIZES``) with the default jitter and ``max_size``; each
batch is padded as ``collate`` pads it (``data.sampler.padding``, which training also logs at its
start). Reported per setting (aspect groups x jitter levels, or stride padding): mean padded megapixels
per image, the images' own megapixels, and how many distinct padded shapes occurred. The fixed-shape
benchmark's 800x1344 is 1.075 Mpx.

    python benchmarks/bench_padding.py [--images 3000] [--batches 1500] [--batch 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
from pathlib import Path

from common import emit

from retinaflow.config import DataConfig
from retinaflow.data.coco import CocoDataset
from retinaflow.data.sampler import padding, train_batches
from retinaflow.data.synthetic import COCO_SIZES

SETTINGS = ("buckets:2x1", "buckets:2x3", "buckets:3x4", "buckets:3x6", "buckets:4x8", "stride")


def _dataset(root: Path, images: int) -> tuple[str, str]:
    """A COCO file listing ``images`` entries of COCO's sizes (empty files: only the sizes are read)."""
    rng = random.Random(0)
    entries = []
    for i in range(images):
        width, height = rng.choice(COCO_SIZES)
        (root / f"{i}.jpg").touch()
        entries.append({"id": i + 1, "file_name": f"{i}.jpg", "width": width, "height": height})
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 0}
            for i in range(1, images + 1)]  # fmt: skip
    path = root / "instances.json"
    categories = [{"id": 1, "name": "x"}]
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    return str(root), str(path)


def measure(data: DataConfig, batches: int, batch: int) -> dict[str, float]:
    assert data.images and data.annotations
    dataset = CocoDataset(data.images, data.annotations, None)
    sampler, policy = train_batches(dataset, data, batch, 0, 0, 1, 0)
    pad = padding(sampler, policy, dataset.image_sizes(), data, count=batches)
    return {
        "padded_mpx_per_image": round(pad.padded_mpx, 3),
        "image_mpx_per_image": round(pad.image_mpx, 3),
        "padded_shapes": pad.shapes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batches", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        images, annotations = _dataset(Path(tmp), args.images)
        base = DataConfig(images=images, annotations=annotations)
        for setting in SETTINGS:
            if setting == "stride":
                data = dataclasses.replace(base, shapes="stride")
            else:
                groups, levels = (int(v) for v in setting.split(":")[1].split("x"))
                data = dataclasses.replace(base, aspect_groups=groups, bucket_levels=levels)
            out[setting] = measure(data, args.batches, args.batch)
            print(setting, out[setting], flush=True)
    default = DataConfig()
    emit(
        "padding",
        {
            "batch": args.batch,
            "jitter": list(default.jitter),
            "max_size": default.max_size,
            "default": f"buckets:{default.aspect_groups}x{default.bucket_levels}",
            "fixed_shape_mpx": round(800 * 1344 / 1e6, 3),
            "settings": out,
        },
    )


if __name__ == "__main__":
    main()
