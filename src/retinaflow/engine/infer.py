"""Batched inference: network under autocast, GPU-side decode + NMS, COCO results JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import Config, DataConfig, InferConfig
from retinaflow.data.batch import Batch
from retinaflow.engine.callbacks import EvalResult
from retinaflow.engine.checkpoint import load_checkpoint
from retinaflow.engine.ema import inference_weights
from retinaflow.engine.schedule import autocast_dtype
from retinaflow.errors import DataError
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.retinanet import RetinaNet, build_model, fold_for_inference
from retinaflow.ops.boxes import Detections, postprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


Network = Callable[[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]


@torch.no_grad()
def detect(network: Network, images: torch.Tensor, sizes: torch.Tensor, config: Config) -> Detections:
    """Network + post-processing for one padded batch already on the network's device.

    network: a RetinaNet (or a compiled one); images: (B, 3, H, W) uint8/float RGB 0..255;
    sizes: (B, 2) (height, width) before padding.
    Returns fixed-size Detections (B, max_det) in resized-image pixels.
    """
    cls_out, box_out = network(images)
    anchors = generate_anchors(
        config.model.anchors, (images.shape[-2], images.shape[-1]), images.device, torch.float32
    )
    return postprocess(cls_out, box_out, anchors, sizes, config.infer)


Detector = Callable[[torch.Tensor, torch.Tensor], Detections]


def prepare_for_inference(model: RetinaNet, dtype: torch.dtype | None) -> RetinaNet:
    """In place, for a model that will never train again: batch norms folded into the convolutions
    (:func:`~retinaflow.model.retinanet.fold_for_inference`: trained ones too, ``model.norm=bn`` and the
    per-level head norms of ``model.head_norm=bn``), weights converted to ``dtype`` (None keeps them).
    Returns ``model``, in eval mode."""
    fold_for_inference(model)
    if dtype is not None:
        model.to(dtype)
    return model


def make_detector(
    model: RetinaNet,
    config: Config,
    amp_dtype: torch.dtype | None,
    inference_only: bool = False,
) -> Detector:
    """``detector(images, sizes) -> Detections`` for padded batches on the model's device.

    amp_dtype:      run the network in this precision (None = float32).
    inference_only: the model will never train again: fold its frozen batch norms into the
                    convolutions and convert its weights to ``amp_dtype`` once instead of autocasting
                    every call (modifies ``model`` in place; its state dict no longer loads checkpoints).
    With ``config.infer.compile`` (a backend name) the network goes through ``torch.compile``.
    With ``config.infer.cuda_graph`` and CUDA tensors, each input shape is captured once as a CUDA
    graph (pre-processing, network and post-processing) and replayed; outputs are copied out.
    """
    autocast_dtype_ = amp_dtype
    if inference_only:
        prepare_for_inference(model, amp_dtype)
        autocast_dtype_ = None
    network: Network = model
    if config.infer.compile:
        network = torch.compile(model, backend=config.infer.compile)  # type: ignore[assignment]

    def eager(images: torch.Tensor, sizes: torch.Tensor) -> Detections:
        if autocast_dtype_ is None:
            return detect(network, images, sizes, config)
        with torch.autocast(images.device.type, dtype=autocast_dtype_):
            return detect(network, images, sizes, config)

    if not config.infer.cuda_graph:
        return eager
    return _GraphCache(eager)


class _GraphCache:
    """One captured CUDA graph per input shape (at most ``limit``; older ones are dropped)."""

    def __init__(self, fn: Detector, limit: int = 16) -> None:
        self.fn, self.limit = fn, limit
        self.graphs: dict[tuple[Any, ...], Any] = {}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, sizes: torch.Tensor) -> Detections:
        if images.device.type != "cuda":
            return self.fn(images, sizes)
        from retinaflow.ops.graph import CudaGraphRunner

        key = (tuple(images.shape), images.dtype, images.is_contiguous(memory_format=torch.channels_last))
        runner = self.graphs.pop(key, None)
        if runner is None:
            if len(self.graphs) >= self.limit:
                self.graphs.pop(next(iter(self.graphs)))
            runner = CudaGraphRunner(self.fn, [images, sizes.to(images.device)])
        self.graphs[key] = runner  # most recently used last
        out = runner(images, sizes.to(images.device))
        return Detections(*(t.clone() for t in (out.scores, out.boxes, out.classes, out.counts)))


@torch.no_grad()
def predict(
    model: RetinaNet,
    loader: Iterable[Batch],
    config: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    category_ids: list[int],
    detector: Detector | None = None,
) -> list[dict[str, Any]]:
    """COCO results for every image of ``loader``: boxes [x, y, w, h] in original image pixels."""
    was_training = model.training
    model.eval()
    run = detector or make_detector(model, config, amp_dtype)
    results: list[dict[str, Any]] = []
    cat_lut = torch.tensor(category_ids, dtype=torch.int64)
    for batch in loader:
        images = batch.images.to(device, non_blocking=True)
        if config.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dets = run(images, batch.sizes.to(device, non_blocking=True))
        results.extend(to_coco_results(dets, batch, cat_lut))
    model.train(was_training)
    return results


def to_coco_results(dets: Detections, batch: Batch, cat_lut: torch.Tensor) -> list[dict[str, Any]]:
    """COCO results of a batch: boxes mapped back to original pixels and clipped to the original image.

    One host transfer per batch, then plain lists (no per-box tensor ops).
    """
    scores = dets.scores.float().cpu()
    scales = batch.scales.float().cpu().view(-1, 1, 1)
    boxes = dets.boxes.float().cpu() / scales
    original_hw = (batch.sizes.float().cpu().view(-1, 1, 2) / scales).round()  # (B, 1, 2) = (h, w)
    limit = original_hw.flip(-1).repeat(1, 1, 2)  # (B, 1, 4) = (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    classes = dets.classes.cpu()
    counts = dets.counts.cpu().tolist()
    xywh = torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)
    out = []
    for i, n in enumerate(counts):
        image_id = int(batch.image_ids[i])
        cats = cat_lut[classes[i, :n]].tolist()
        for s, b, c in zip(scores[i, :n].tolist(), xywh[i, :n].tolist(), cats, strict=True):
            out.append({"image_id": image_id, "category_id": c, "bbox": [round(v, 2) for v in b], "score": s})
    return out


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[RetinaNet, Config, dict[str, Any]]:
    """Rebuild the network a checkpoint describes and load its weights (eval mode, on ``device``): the
    moving average of the weights if training kept one (``train.ema``), else the trained weights."""
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"])
    model = build_model(config.model)
    model.load_state_dict(inference_weights(state))
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
    overrides: dict[str, Any] | None = None,
) -> EvalResult | None:
    """Detect objects in every image of ``images``, write COCO results to ``output`` (each with the
    ``file_name`` of its image: without ``annotations`` the ids are 1..N in file-name order).

    The inference settings are ``cfg`` when given, else the checkpoint's (those saved at training
    time), with ``overrides`` (``InferConfig`` field -> value, e.g. from command-line flags) applied on
    top. With ``annotations`` the detections are also evaluated (COCOeval) and the result returned.
    """
    from retinaflow.data.select import build_eval
    from retinaflow.data.shapes import use_cudnn_benchmark

    images_dir = images_folder(images, output)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, state = load_model(checkpoint, dev)
    config.infer = dataclasses.replace(cfg or config.infer, **(overrides or {}))
    config.data = eval_data(config.infer, config.data)
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(annotations) if annotations else image_list_as_coco(images_dir, state, Path(tmp))
        loader, dataset = build_eval(str(images_dir), str(ann), config.data, config.infer.batch, 0, 1, dev)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = use_cudnn_benchmark(config.infer.cudnn_benchmark, loader.policy)
        amp = autocast_dtype(config.infer.precision, dev)
        detector = make_detector(model, config, amp, inference_only=True)
        dets = predict(model, loader, config, dev, amp, state["category_ids"], detector)
    return write_detections(dets, dataset.file_names, output, annotations, list(config.class_names))


def eval_data(infer: InferConfig, data: DataConfig | None = None) -> DataConfig:
    """The data settings every inference flow (checkpoint, ONNX, engine) loads images with: ``data``
    (default ``DataConfig()``) with the shorter side ``infer.resize`` (longer side capped at
    ``infer.max_size``), batches padded to a multiple of ``infer.pad_stride``, the loader ``infer.loader``.
    Validation during training keeps the ``train --resize/--max-size`` size (see ``_Trainer.validate``)."""
    return dataclasses.replace(
        data or DataConfig(),
        resize=infer.resize,
        max_size=infer.max_size,
        pad_stride=infer.pad_stride,
        loader=infer.loader,
    )


def images_folder(images: str | Path, output: str | Path) -> Path:
    """``images`` after the checks every inference flow makes before loading its model: DataError unless
    it is a folder and ``output`` (the detections JSON to write) is not one."""
    if Path(output).is_dir():
        raise DataError(f"--output {output} is a folder; give the detections JSON file to write")
    images_dir = Path(images)
    if not images_dir.is_dir():
        raise DataError(f"images folder not found: {images_dir}")
    return images_dir


def write_detections(
    dets: list[dict[str, Any]],
    file_names: dict[int, str],
    output: str | Path,
    annotations: str | Path | None,
    class_names: list[str],
) -> EvalResult | None:
    """Write the COCO results ``dets`` to ``output``, each with the ``file_name`` of its image
    (``file_names``: by image id) so that it can be traced back to its file; with ``annotations``,
    evaluate them (COCOeval, ``class_names`` or the annotations' names) and return the result."""
    from retinaflow.engine.evaluate import evaluate_detections

    for d in dets:
        d["file_name"] = file_names[d["image_id"]]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dets))
    log.info("wrote %d detections to %s", len(dets), out)
    return evaluate_detections(annotations, dets, class_names or None) if annotations else None


def image_list_as_coco(images_dir: Path, meta: dict[str, Any], tmp: Path) -> Path:
    """Describe a bare folder of images as a COCO file without annotations, for the eval loader
    (``meta``: a checkpoint's state or an engine's metadata, for ``category_ids`` and ``class_names``)."""
    from retinaflow.data.images import displayed_size

    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    entries = []
    for i, p in enumerate(files, start=1):
        try:
            w, h = displayed_size(p)
        except OSError:
            log.warning("skipping unreadable image %s", p)
            continue
        entries.append({"id": i, "file_name": p.name, "width": w, "height": h})
    cats = [{"id": c, "name": n} for c, n in zip(meta["category_ids"], meta["class_names"], strict=True)]
    path = tmp / "images.json"
    path.write_text(json.dumps({"images": entries, "annotations": [], "categories": cats}))
    return path
