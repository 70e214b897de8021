"""Run a plugin-flavour ONNX (:mod:`retinaflow.export.plugin_onnx`) in ONNX Runtime on the CPU.

The ``retinaflow.Decode`` / ``retinaflow.NMS`` nodes run as Python custom ops (``onnxruntime-extensions``'
``onnx_op``) over the reference implementation (:mod:`retinaflow.ops._reference`), so the node contract
(inputs, outputs, attributes) is checked end to end without TensorRT. onnxruntime-extensions serves Python
ops from its own domain (``ai.onnx.contrib``) with a fixed input count, so the session loads a copy of the
graph whose two nodes are moved to that domain and renamed per level count; nothing else changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinaflow.errors import MissingDependency
from retinaflow.export import plugin_onnx as po
from retinaflow.ops import _reference
from retinaflow.ops.detections import Detections

_registered: set[str] = set()


def session(path: str | Path) -> Any:
    """An ONNX Runtime CPU session of a plugin-flavour ONNX file, its nodes served by Python ops."""
    try:
        import onnx
        import onnxruntime as ort
        from onnxruntime_extensions import get_library_path
    except ImportError as exc:
        raise MissingDependency(
            f"running plugin ONNX on the CPU needs onnxruntime-extensions ({exc}): "
            "pip install 'retinaflow[dev]'"
        ) from exc
    model = onnx.load(str(path))
    decode, nms = po.find_plugin_nodes(model)
    levels = (len(decode.input) - 1) // 3
    decode.domain = nms.domain = _domain()
    decode.op_type, nms.op_type = _register(levels)
    model.opset_import.append(onnx.helper.make_opsetid(_domain(), 1))
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def detect(sess: Any, images: torch.Tensor, sizes: torch.Tensor) -> Detections:
    """images (B, 3, H, W) float RGB 0..255 at the graph's size; sizes (B, 2) → Detections (int64 classes)."""
    scores, boxes, classes, counts = sess.run(
        None, {"images": images.float().numpy(), "sizes": sizes.to(torch.int32).numpy()}
    )
    return Detections(
        torch.from_numpy(scores),
        torch.from_numpy(boxes),
        torch.from_numpy(classes).long(),
        torch.from_numpy(counts).long(),
    )


def _domain() -> str:
    from onnxruntime_extensions import default_opset_domain

    return str(default_opset_domain())


def _register(levels: int) -> tuple[str, str]:
    """Register Decode (for ``levels`` levels) and NMS as Python ops once; returns their op types."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i32, i64, s = (
        PyCustomOpDef.dt_float,
        PyCustomOpDef.dt_int32,
        PyCustomOpDef.dt_int64,
        PyCustomOpDef.dt_string,
    )
    types = {"float32": f32, "int32": i64}  # ONNX int attributes are int64
    ident = dict.fromkeys(po.PARSER_ATTRIBUTES, s)
    decode_op, nms_op = f"Retinaflow{po.DECODE_OP}{levels}", f"Retinaflow{po.NMS_OP}"
    if decode_op not in _registered:

        @onnx_op(
            op_type=decode_op,
            inputs=[f32] * (3 * levels) + [i32],
            outputs=[f32, f32, i32],
            attrs={**{n: types[t] for n, t in po.DECODE.fields}, **ident},
        )
        def _decode(*args: Any, **attrs: Any) -> tuple[np.ndarray, ...]:
            t = [torch.from_numpy(np.ascontiguousarray(a)) for a in args]
            cls, box, anchors, sizes = t[:levels], t[levels : 2 * levels], t[2 * levels : 3 * levels], t[-1]
            scores, boxes, classes = _reference.decode(
                cls, box, anchors, sizes, attrs["score_thresh"], attrs["top_n"]
            )
            return scores.numpy(), boxes.numpy(), classes.to(torch.int32).numpy()

        _registered.add(decode_op)
    if nms_op not in _registered:

        @onnx_op(
            op_type=nms_op,
            inputs=[f32, f32, i32],
            outputs=[f32, f32, i32, i32],
            attrs={**{n: types[t] for n, t in po.NMS.fields}, **ident},
        )
        def _nms(
            scores: np.ndarray, boxes: np.ndarray, classes: np.ndarray, **attrs: Any
        ) -> tuple[np.ndarray, ...]:
            scores_, boxes_, classes_, counts = _reference.nms(
                torch.from_numpy(scores),
                torch.from_numpy(boxes),
                torch.from_numpy(classes).long(),
                attrs["iou_threshold"],
                attrs["max_det"],
            )
            return (
                scores_.numpy(),
                boxes_.numpy(),
                classes_.to(torch.int32).numpy(),
                counts.to(torch.int32).numpy(),
            )

        _registered.add(nms_op)
    return decode_op, nms_op
