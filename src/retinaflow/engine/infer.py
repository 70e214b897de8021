"""Batched inference: network under autocast, GPU-side decode + NMS, COCO results JSON."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import Config, InferConfig
from retinaflow.data.batch import Batch
from retinaflow.engine.callbacks import EvalResult
from retinaflow.engine.checkpoint import load_checkpoint
from retinaflow.engine.schedule import autocast_dtype
from retinaflow.errors import DataError
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.retinanet import RetinaNet, build_model
from retinaflow.ops.boxes import Detections, postprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@torch.no_grad()
def detect(model: RetinaNet, images: torch.Tensor, sizes: torch.Tensor, config: Config) -> Detections:
    """Network + post-processing for one padded batch already on the model's device.

    images: (B, 3, H, W) uint8/float RGB 0..255; sizes: (B, 2) (height, width) before padding.
    Returns fixed-size Detections (B, max_det) in resized-image pixels.
    """
    cls_out, box_out = model(images)
    anchors = generate_anchors(config.model.anchors, tuple(images.shape[-2:]), images.device, torch.float32)
    return postprocess(cls_out, box_out, anchors, sizes, config.infer)


@torch.no_grad()
def predict(
    model: RetinaNet,
    loader: Iterable[Batch],
    config: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    category_ids: list[int],
) -> list[dict[str, Any]]:
    """COCO results for every image of ``loader``: boxes [x, y, w, h] in original image pixels."""
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    cat_lut = torch.tensor(category_ids, dtype=torch.int64)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for batch in loader:
        images = batch.images.to(device, non_blocking=True)
        if config.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            dets = detect(model, images, batch.sizes.to(device), config)
        results.extend(to_coco_results(dets, batch, cat_lut))
    model.train(was_training)
    return results


def to_coco_results(dets: Detections, batch: Batch, cat_lut: torch.Tensor) -> list[dict[str, Any]]:
    """One host transfer per batch, then plain lists (no per-box tensor ops)."""
    scores = dets.scores.float().cpu()
    boxes = dets.boxes.float().cpu() / batch.scales.view(-1, 1, 1)
    classes = dets.classes.cpu()
    counts = dets.counts.cpu().tolist()
    xywh = torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)
    out = []
    for i, n in enumerate(counts):
        image_id = int(batch.image_ids[i])
        cats = cat_lut[classes[i, :n]].tolist()
        for s, b, c in zip(scores[i, :n].tolist(), xywh[i, :n].tolist(), cats):
            out.append({"image_id": image_id, "category_id": c, "bbox": [round(v, 2) for v in b], "score": s})
    return out


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[RetinaNet, Config, dict[str, Any]]:
    """Rebuild the network a checkpoint describes and load its weights (eval mode, on ``device``)."""
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"])
    model = build_model(config.model)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, config, state


def infer(
    checkpoint: str | Path,
    images: str | Path,
    output: str | Path,
    cfg: InferConfig | None = None,
    annotations: str | Path | None = None,
    device: str | None = None,
) -> EvalResult | None:
    """Detect objects in every image of ``images``, write COCO results to ``output``.

    With ``annotations`` the detections are also evaluated (COCOeval) and the result returned.
    """
    from retinaflow.data.loader import build_eval_loader
    from retinaflow.engine.evaluate import evaluate

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, state = load_model(checkpoint, dev)
    if cfg is not None:
        config.infer = cfg
    config.data.resize, config.data.max_size = config.infer.resize, config.infer.max_size
    images_dir = Path(images)
    if not images_dir.is_dir():
        raise DataError(f"images folder not found: {images_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(annotations) if annotations else _image_list_as_coco(images_dir, state, Path(tmp))
        loader, _ = build_eval_loader(str(images_dir), str(ann), config.data, config.infer.batch)
        dets = predict(
            model, loader, config, dev, autocast_dtype(config.infer.precision, dev), state["category_ids"]
        )
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dets))
    log.info("wrote %d detections to %s", len(dets), out)
    if annotations:
        return evaluate(annotations, dets, list(config.class_names))
    return None


def _image_list_as_coco(images_dir: Path, state: dict[str, Any], tmp: Path) -> Path:
    """Describe a bare folder of images as a COCO file without annotations, for the eval loader."""
    from PIL import Image

    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    entries = []
    for i, p in enumerate(files, start=1):
        try:
            with Image.open(p) as im:
                w, h = im.size
        except OSError:
            log.warning("skipping unreadable image %s", p)
            continue
        entries.append({"id": i, "file_name": p.name, "width": w, "height": h})
    cats = [{"id": c, "name": n} for c, n in zip(state["category_ids"], state["class_names"])]
    path = tmp / "images.json"
    path.write_text(json.dumps({"images": entries, "annotations": [], "categories": cats}))
    return path
