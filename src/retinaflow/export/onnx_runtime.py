"""Detection through an exported ONNX model in ONNX Runtime, evaluated like the PyTorch model.

An end-to-end graph (decode + NMS inside, the default export) runs through
:mod:`retinaflow.export.engine_infer`. A network-only graph (see :mod:`retinaflow.export.onnx`) returns
the raw per-level head maps for a fixed input ``(batch, 3, H, W)``; this module feeds it the same padded
batches as ``retinaflow infer`` (zero-padded further to H x W at the bottom/right, which leaves pixel
coordinates unchanged), decodes with the same anchors and post-processing, and writes COCO results.
Used by the pipeline's evaluate step to catch an mAP drop after export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import Config, InferConfig
from retinaflow.engine.callbacks import EvalResult
from retinaflow.errors import ConfigError, MissingDependency
from retinaflow.export.metadata import OUTPUTS

log = logging.getLogger(__name__)


def infer_onnx(
    onnx_model: str | Path,
    checkpoint: str | Path,
    images: str | Path,
    annotations: str | Path,
    output: str | Path,
    cfg: InferConfig | None = None,
) -> EvalResult:
    """Detect every image of ``annotations`` with ``onnx_model`` on the CPU; evaluate against them.

    ``checkpoint`` is the model the ONNX file was exported from: it supplies the anchors, the
    inference settings and the category ids. ``output`` receives the COCO results (boxes
    [x, y, w, h] in original image pixels).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependency("ONNX evaluation needs onnxruntime: pip install 'retinaflow[onnx]'") from exc
    from retinaflow.data.loader import build_eval_loader
    from retinaflow.engine.checkpoint import load_checkpoint
    from retinaflow.engine.evaluate import evaluate_detections
    from retinaflow.engine.infer import to_coco_results
    from retinaflow.model.anchors import generate_anchors
    from retinaflow.ops.boxes import postprocess

    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"])
    if cfg is not None:
        config.infer = cfg
    config.data.resize, config.data.max_size = config.infer.resize, config.infer.max_size
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    if [o.name for o in session.get_outputs()] == list(OUTPUTS):  # end to end: decode + NMS inside
        from retinaflow.export.engine_infer import infer_engine

        result = infer_engine(onnx_model, images, output, annotations, config.infer.batch)
        assert result is not None
        return result
    height, width = _input_hw(session)
    anchors = generate_anchors(config.model.anchors, (height, width), torch.device("cpu"), torch.float32)
    cat_lut = torch.tensor(state["category_ids"], dtype=torch.int64)
    loader, _ = build_eval_loader(str(images), str(annotations), config.data, config.infer.batch)
    results: list[dict[str, Any]] = []
    for batch in loader:
        padded = _pad_to(batch.images.float(), height, width)
        outputs = session.run(None, {"images": padded.numpy()})
        levels = len(outputs) // 2
        cls = [torch.from_numpy(o) for o in outputs[:levels]]
        box = [torch.from_numpy(o) for o in outputs[levels:]]
        dets = postprocess(cls, box, anchors, batch.sizes, config.infer)
        results.extend(to_coco_results(dets, batch, cat_lut))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results))
    log.info("ONNX Runtime: wrote %d detections to %s", len(results), out)
    return evaluate_detections(annotations, results, list(config.class_names) or None)


def _input_hw(session: Any) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    if not (isinstance(shape[2], int) and isinstance(shape[3], int)):
        raise ConfigError(f"ONNX model input must have a fixed height and width, got {shape}")
    return int(shape[2]), int(shape[3])


def _pad_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, h, w) → (B, 3, height, width), zeros at the bottom and right."""
    h, w = images.shape[-2:]
    if h > height or w > width:
        raise ConfigError(
            f"a batch of {h}x{w} does not fit the ONNX input {height}x{width}: export at a size that covers "
            "the inference max_size, padded to a multiple of 128"
        )
    return torch.nn.functional.pad(images, (0, width - w, 0, height - h))
