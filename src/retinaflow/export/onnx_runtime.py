"""Detection through an exported ONNX model in ONNX Runtime, evaluated like the PyTorch model.

An end-to-end graph (decode + NMS inside, the default export) runs through
:mod:`retinaflow.export.engine_infer`. A network-only graph (see :mod:`retinaflow.export.onnx`) returns
the raw per-level head maps for a fixed input ``(batch, 3, H, W)``; this module feeds it the same padded
batches as ``retinaflow infer`` (zero-padded further to H x W at the bottom/right, which leaves pixel
coordinates unchanged), decodes with the same anchors and post-processing, and writes COCO results.
Used by the pipeline's evaluate step to catch an mAP drop after export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retinaflow.config import Config, InferConfig
from retinaflow.engine.callbacks import EvalResult
from retinaflow.errors import ConfigError, MissingDependency
from retinaflow.export.metadata import OUTPUTS


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
    from retinaflow.engine.infer import eval_data, images_folder, to_coco_results, write_detections
    from retinaflow.export.engine_infer import infer_engine, pad_to
    from retinaflow.model.anchors import generate_anchors
    from retinaflow.ops.boxes import postprocess

    images_dir = images_folder(images, output)
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"])
    infer = cfg or config.infer
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    if [o.name for o in session.get_outputs()] == list(OUTPUTS):  # end to end: decode + NMS inside
        result = infer_engine(onnx_model, images_dir, output, annotations, "cpu", {"batch": infer.batch})
    else:
        height, width = _input_hw(session)
        name = Path(onnx_model).name
        anchors = generate_anchors(config.model.anchors, (height, width), torch.device("cpu"), torch.float32)
        cat_lut = torch.tensor(state["category_ids"], dtype=torch.int64)
        data = eval_data(infer, config.data)
        loader, dataset = build_eval_loader(str(images_dir), str(annotations), data, infer.batch)
        results: list[dict[str, Any]] = []
        for batch in loader:
            padded = pad_to(batch.images.float(), (height, width), name)
            outputs = session.run(None, {"images": padded.numpy()})
            levels = len(outputs) // 2
            cls = [torch.from_numpy(o) for o in outputs[:levels]]
            box = [torch.from_numpy(o) for o in outputs[levels:]]
            dets = postprocess(cls, box, anchors, batch.sizes, infer)
            results.extend(to_coco_results(dets, batch, cat_lut))
        result = write_detections(results, dataset.file_names, output, annotations, list(config.class_names))
    assert result is not None  # annotations given
    return result


def _input_hw(session: Any) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    if not (isinstance(shape[2], int) and isinstance(shape[3], int)):
        raise ConfigError(f"ONNX model input must have a fixed height and width, got {shape}")
    return int(shape[2]), int(shape[3])
