"""The network of an ONNX export in fp16 or int8, and how its graph is checked.

fp16: weights and activations in float16; the graph casts its input to float16 and the head maps back
to float32, so inputs, outputs and decode + NMS keep their types. int8: ModelOpt's fake quantizers,
calibrated by :func:`retinaflow.export.quantize.quantize_for_export`, exported as
QuantizeLinear/DequantizeLinear pairs (ONNX Runtime and TensorRT run them as int8 convolutions).
Neither meets the fp32 parity tolerances (:mod:`.parity`): the network graph is compared with its
PyTorch reference in relative L2 norm over all class maps and over all box maps, :data:`NETWORK_RTOL`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import torch

from retinaflow.config import Config, ExportConfig
from retinaflow.errors import MissingDependency
from retinaflow.export.parity import ExportMismatch, ParityReport
from retinaflow.export.spec import EngineSpec
from retinaflow.model.retinanet import RetinaNet

# ||ort - reference|| / ||reference|| over the class maps, and over the box maps, of a batch. fp16: against
# the fp32 network (measured on the tests' tiny checkpoint: 9e-4); int8: ONNX Runtime's integer convolutions
# against ModelOpt's float simulation of them, which rounds some values to the neighbouring step
# (measured: 6e-4 class maps, 2.3e-2 box maps, whose random-init values are small). A lost or misscaled
# quantizer gives errors of order 1.
NETWORK_RTOL = {"fp16": 5e-3, "int8": 5e-2}


@dataclass
class Lowered:
    """A network ready to export in ``precision`` and the module its ONNX graph is compared with.

    model: the RetinaNet to trace (float16 weights, or float32 with int8 fake quantizers).
    reference: images (B, 3, H, W) float32 -> the head maps, cls_* then box_*, float32.
    """

    model: RetinaNet
    reference: torch.nn.Module
    precision: str


class FlatHeads(torch.nn.Module):
    """``images (B, 3, H, W) float32 -> (cls_p3, .., box_p3, ..)`` float32, whatever the network's dtype:
    a flat tuple so that every ONNX output gets a name."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.dtype == torch.float32:  # no Cast nodes in a float32 graph (the tracer records no-op casts)
            cls, box = self.model(images)
            return (*cls, *box)
        cls, box = self.model(images.to(self.dtype))
        return tuple(t.float() for t in (*cls, *box))


def lower(model: RetinaNet, config: Config, cfg: ExportConfig) -> Lowered:
    """``model`` (float32, batch norms folded) in ``cfg.precision``, in place. int8 calibrates first
    (see :func:`retinaflow.export.quantize.quantize_for_export`); fp32 returns it as it is."""
    if cfg.precision == "fp16":
        reference = FlatHeads(copy.deepcopy(model)).eval()
        return Lowered(model.half(), reference, "fp16")
    if cfg.precision == "int8":
        from retinaflow.export.quantize import quantize_for_export

        quantize_for_export(model, config, cfg)
        return Lowered(model, FlatHeads(model).eval(), "int8")
    return Lowered(model, FlatHeads(model).eval(), cfg.precision)


def precision_metadata(cfg: ExportConfig) -> dict[str, str]:
    """Metadata entries of a lowered engine: how an int8 one was calibrated (none otherwise)."""
    if cfg.precision != "int8":
        return {}
    calibration = {
        "images": cfg.calibration_images,
        "data": list(cfg.calibration_data) if cfg.calibration_data else "checkpoint training data",
        "keep_head": cfg.int8_keep_head,
    }
    return {"int8_calibration": json.dumps(calibration)}


def check_network(lowered: Lowered, path: str, spec: EngineSpec, seed: int = 0) -> ParityReport:
    """Compare a network-only graph in ONNX Runtime (CPU) with ``lowered.reference`` on random images at
    batch 1 and 2: ExportMismatch when the class or the box maps' relative L2 error exceeds NETWORK_RTOL."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependency("parity check needs onnxruntime: pip install 'retinaflow[onnx]'") from exc
    rtol = NETWORK_RTOL[lowered.precision]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    batches = (spec.min_batch, min(spec.max_batch, 2)) if spec.dynamic_batch else (spec.max_batch,)
    worst = 0.0
    for b in dict.fromkeys(batches):
        images = torch.rand(b, 3, spec.height, spec.width, generator=gen) * 255
        with torch.no_grad():
            expected = [t.numpy() for t in lowered.reference(images)]
        got = session.run(None, {"images": images.numpy()})
        levels = len(expected) // 2
        for kind, part in (("class", slice(0, levels)), ("box", slice(levels, None))):
            e, g = (np.concatenate([x.ravel() for x in maps[part]]) for maps in (expected, got))
            rel = float(np.linalg.norm(g - e) / max(float(np.linalg.norm(e)), 1e-12))
            worst = max(worst, rel)
            if rel > rtol:
                raise ExportMismatch(
                    f"the {lowered.precision} ONNX network's {kind} maps differ from PyTorch by {rel:.3g} in "
                    f"relative L2 (tolerance {rtol}) at batch {b}"
                )
    return ParityReport(max_abs=worst, max_rel=worst, batch_sizes=tuple(dict.fromkeys(batches)))
