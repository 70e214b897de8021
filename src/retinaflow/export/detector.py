"""The whole detector as one module: uint8 images in, fixed-size detections out (what engines contain).

``forward(images: (B, 3, H, W) uint8 RGB zero-padded at the bottom/right to the engine size,
sizes: (B, 2) int64 (height, width) of each image before padding)`` returns
``num_detections (B,) int64, boxes (B, D, 4) float32 x1y1x2y2 in input pixels, scores (B, D) float32,
classes (B, D) int64`` (class index 0..C-1, -1 on padding rows), D = ``infer.max_det``.

Post-processing is ``torch.ops.retinaflow.decode/nms`` (their fake impls make them exportable with
``torch.export``; the engine calls the registered CPU/CUDA impls) or, for ONNX, the standard-op version of
:mod:`.onnx_postprocess`. The anchors of the fixed input size are constants of the module.
"""

from __future__ import annotations

import torch

import retinaflow.ops._library  # noqa: F401  (defines torch.ops.retinaflow.*)
from retinaflow.config import Config
from retinaflow.export.onnx_postprocess import OnnxPostprocess
from retinaflow.export.spec import EngineSpec
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.retinanet import RetinaNet

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EndToEnd(torch.nn.Module):
    """RetinaNet + decode + NMS for one fixed input size; see the module docstring for the I/O."""

    def __init__(self, model: RetinaNet, config: Config, spec: EngineSpec, onnx_ops: bool = False) -> None:
        super().__init__()
        self.model, self.infer = model, config.infer
        device = next(model.parameters()).device  # anchors live with the network (constants of the engine)
        anchors = generate_anchors(config.model.anchors, (spec.height, spec.width), device, torch.float32)
        self.levels = len(anchors)
        self.onnx = OnnxPostprocess(anchors, model.num_classes, config.infer) if onnx_ops else None
        for i, a in enumerate(anchors):
            self.register_buffer(f"anchors{i}", a.clone(), persistent=False)

    def forward(self, images: torch.Tensor, sizes: torch.Tensor) -> Outputs:
        cls, box = self.model(images)
        if self.onnx is not None:
            return self.onnx(cls, box, sizes)
        anchors = [getattr(self, f"anchors{i}") for i in range(self.levels)]
        cfg = self.infer
        scores, boxes, classes = torch.ops.retinaflow.decode(
            cls, box, anchors, sizes, float(cfg.score_thresh), int(cfg.top_n), 0
        )
        scores, boxes, classes, counts = torch.ops.retinaflow.nms(
            scores, boxes, classes, float(cfg.nms_iou), int(cfg.max_det)
        )
        return counts, boxes, scores, classes


def end_to_end_reference(
    model: torch.nn.Module, config: Config, spec: EngineSpec, onnx_ops: bool = False
) -> EndToEnd:
    """``EndToEnd`` around ``model`` (a RetinaNet), in eval mode."""
    assert isinstance(model, RetinaNet)
    return EndToEnd(model, config, spec, onnx_ops).eval()
