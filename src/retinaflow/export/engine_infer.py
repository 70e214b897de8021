"""``retinaflow infer`` on an exported engine: the same loader, resize and COCO results as on a checkpoint.

Images are resized with the engine's saved inference settings, zero-padded at the bottom/right to the
engine's input size (pixel coordinates unchanged) and run through it; the detections JSON is that of
:func:`retinaflow.engine.infer.infer`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import DataConfig
from retinaflow.engine.callbacks import EvalResult
from retinaflow.errors import ConfigError
from retinaflow.export.engines import Engine, open_engine
from retinaflow.export.metadata import infer_config
from retinaflow.export.spec import NETWORK_STRIDE
from retinaflow.ops.detections import Detections

DEFAULT_BATCH = 8

log = logging.getLogger(__name__)


def infer_engine(
    engine_path: str | Path,
    images: str | Path,
    output: str | Path,
    annotations: str | Path | None = None,
    batch: int | None = None,
    device: str | None = None,
    cuda_graph: bool = False,
) -> EvalResult | None:
    """Detect every image of ``images`` with the engine; write COCO results; evaluate with ``annotations``.
    ``cuda_graph``: replay a .pt2 engine from CUDA graphs (``retinaflow infer ENGINE --cuda-graph``)."""
    from retinaflow.engine.infer import image_list_as_coco, images_folder, write_detections

    images_dir = images_folder(images, output)
    t0 = time.perf_counter()
    engine = open_engine(engine_path, device, cuda_graph)
    meta = engine.meta
    log.info(
        "engine %s loaded in %.2f s: %s %s, batch %s..%s, input %dx%d, on %s",
        engine.path.name,
        time.perf_counter() - t0,
        meta.get("format", engine.path.suffix.lstrip(".")),
        meta.get("precision", "?"),
        meta.get("min_batch", "?"),
        meta.get("max_batch", "?"),
        *engine.input_hw,
        engine.device,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(annotations) if annotations else image_list_as_coco(images_dir, engine.meta, Path(tmp))
        dets, file_names = detect_folder(engine, images_dir, ann, batch)
    return write_detections(dets, file_names, output, annotations, list(engine.meta.get("class_names", [])))


def detect_folder(
    engine: Engine, images_dir: Path, annotations: Path, batch: int | None
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """COCO results (boxes [x, y, w, h] in original pixels) of every image of ``annotations``, in dataset
    order, and the file name of each image id. Images are loaded as the engine's saved inference settings
    say (``DataConfig.workers`` 0)."""
    from retinaflow.data.loader import build_eval_loader
    from retinaflow.engine.infer import eval_data, to_coco_results

    meta = engine.meta
    data = eval_data(infer_config(meta), DataConfig(workers=0))
    size = batch if batch is not None else min(DEFAULT_BATCH, int(meta["max_batch"]))
    loader, dataset = build_eval_loader(str(images_dir), str(annotations), data, size)
    cat_lut = torch.tensor(meta["category_ids"], dtype=torch.int64)
    results: list[dict[str, Any]] = []
    for b in loader:
        dets = run_padded(engine, pad_to(b.images, engine.input_hw, engine.path.name), b.sizes)
        results.extend(to_coco_results(dets, b, cat_lut))
    return results, dataset.file_names


def pad_to(images: torch.Tensor, hw: tuple[int, int], name: str) -> torch.Tensor:
    """(B, 3, h, w) -> (B, 3, H, W), zeros at the bottom and right; ConfigError if it does not fit."""
    h, w = images.shape[-2:]
    height, width = hw
    if h > height or w > width:
        raise ConfigError(
            f"resized images of {h}x{w} do not fit {name}'s input {height}x{width}: re-export with "
            f"--size {max(h, height)} {max(w, width)} (or the default size, which covers both orientations)"
        )
    return torch.nn.functional.pad(images, (0, width - w, 0, height - h))


def run_padded(engine: Engine, images: torch.Tensor, sizes: torch.Tensor) -> Detections:
    """``engine(images, sizes)``; a batch below the engine's minimum (the last one) is filled with blank
    images whose detections are dropped."""
    n, lo = images.shape[0], int(engine.meta["min_batch"])
    if n >= lo:
        return engine(images, sizes)
    fill = lo - n
    images = torch.cat([images, images.new_zeros(fill, *images.shape[1:])])
    sizes = torch.cat([sizes, sizes.new_full((fill, 2), NETWORK_STRIDE)])
    d = engine(images, sizes)
    return Detections(d.scores[:n], d.boxes[:n], d.classes[:n], d.counts[:n])
