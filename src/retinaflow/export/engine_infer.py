"""``retinaflow infer`` on an exported engine: the same loader, resize and COCO results as on a checkpoint.

Images are resized with the engine's saved inference settings, zero-padded at the bottom/right to the
engine's input size (pixel coordinates unchanged) and run through it; the detections JSON is that of
:func:`retinaflow.engine.infer.infer`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import DataConfig, InferConfig
from retinaflow.data.shapes import ShapePolicy, use_cudnn_benchmark
from retinaflow.engine.callbacks import EvalResult
from retinaflow.errors import ConfigError
from retinaflow.export.engines import Engine, open_engine
from retinaflow.export.metadata import infer_config
from retinaflow.export.spec import NETWORK_STRIDE
from retinaflow.ops.detections import Detections

DEFAULT_BATCH = 8

#: ``InferConfig`` fields an exported engine does not fix (the rest are baked in at export time).
ENGINE_INFER_KEYS = ("batch", "loader", "cudnn_benchmark", "cuda_graph")

log = logging.getLogger(__name__)


def infer_engine(
    engine_path: str | Path,
    images: str | Path,
    output: str | Path,
    annotations: str | Path | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> EvalResult | None:
    """Detect every image of ``images`` with the engine; write COCO results; evaluate with ``annotations``.

    ``overrides``: the inference settings an engine does not fix (``ENGINE_INFER_KEYS``; e.g. from
    ``retinaflow infer ENGINE`` flags): ``batch`` (default: 8 or the engine's largest batch if smaller),
    ``loader`` (default "torch"), ``cudnn_benchmark`` ("auto" is on: an engine has one input size) and
    ``cuda_graph`` (replay a .pt2 engine from CUDA graphs). Other settings are the engine's own, saved at
    export.
    """
    from retinaflow.engine.infer import image_list_as_coco, images_folder, write_detections

    given = dict(overrides or {})
    unknown = sorted(set(given) - set(ENGINE_INFER_KEYS))
    if unknown:
        raise ConfigError(f"an engine fixes infer.{unknown[0]} at export: re-export to change it")
    images_dir = images_folder(images, output)
    t0 = time.perf_counter()
    engine = open_engine(engine_path, device, bool(given.pop("cuda_graph", False)))
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
    given.setdefault("batch", min(DEFAULT_BATCH, int(meta["max_batch"])))
    given.setdefault("loader", "torch")  # DALI on request: its engine path is not yet verified on a GPU
    infer = dataclasses.replace(infer_config(meta), **given)
    if engine.device.type == "cuda":  # "auto": on, the engine has a single input shape
        one_shape = ShapePolicy(buckets=(engine.input_hw,), stride=NETWORK_STRIDE)
        torch.backends.cudnn.benchmark = use_cudnn_benchmark(infer.cudnn_benchmark, one_shape)
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(annotations) if annotations else image_list_as_coco(images_dir, engine.meta, Path(tmp))
        dets, file_names = detect_folder(engine, images_dir, ann, infer)
    return write_detections(dets, file_names, output, annotations, list(engine.meta.get("class_names", [])))


def detect_folder(
    engine: Engine, images_dir: Path, annotations: Path, infer: InferConfig
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """COCO results (boxes [x, y, w, h] in original pixels) of every image of ``annotations``, in dataset
    order, and the file name of each image id. Images are loaded as ``infer`` says (the engine's saved
    resize settings, ``infer.loader``, ``infer.batch``; ``DataConfig.workers`` 0 for the torch loader)."""
    from retinaflow.data.select import build_eval
    from retinaflow.engine.infer import eval_data, to_coco_results

    data = eval_data(infer, DataConfig(workers=0))
    loader, dataset = build_eval(str(images_dir), str(annotations), data, infer.batch, 0, 1, engine.device)
    cat_lut = torch.tensor(engine.meta["category_ids"], dtype=torch.int64)
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
