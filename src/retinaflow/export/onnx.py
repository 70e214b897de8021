"""ONNX export of backbone + FPN + heads (raw score/box maps per level), checked in ONNX Runtime.

The graph takes ``images: (batch, 3, H, W) float32`` RGB 0..255 (normalisation is inside) and returns
``cls_p3..cls_p7: (batch, A*C, H/s, W/s)`` logits and ``box_p3..box_p7: (batch, A*4, H/s, W/s)``
deltas. The batch dimension is dynamic. Decoding and NMS run outside (CUDA kernels / TensorRT plugins).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retinaflow.config import ExportConfig
from retinaflow.engine.infer import load_model
from retinaflow.errors import ConfigError, MissingDependency, RetinaflowError
from retinaflow.model.norm import fold_batchnorm

log = logging.getLogger(__name__)

LEVELS = ("p3", "p4", "p5", "p6", "p7")
RTOL, ATOL = 1e-3, 1e-3  # ONNX Runtime (CPU, fp32) vs PyTorch fp32, relative to logits of order 1-10


class ExportMismatch(RetinaflowError):
    """ONNX Runtime outputs differ from PyTorch beyond the stated tolerance."""


@dataclass
class ParityReport:
    """Largest absolute and relative differences between ONNX Runtime and PyTorch outputs."""

    max_abs: float
    max_rel: float
    batch_sizes: tuple[int, ...]


class _Flat(torch.nn.Module):
    """Returns the per-level lists as a flat tuple so every output gets a name."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls, box = self.model(images)
        return (*cls, *box)


def export_onnx(checkpoint: str | Path, output: str | Path, cfg: ExportConfig | None = None) -> Path:
    """Export ``checkpoint`` to ``output`` (.onnx), run the ONNX checker and the parity check."""
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependency(
            "ONNX export needs onnx and onnxruntime: pip install 'retinaflow[onnx]'"
        ) from exc
    cfg = cfg or ExportConfig()
    if cfg.height % 128 or cfg.width % 128:
        raise ConfigError(f"export size {cfg.height}x{cfg.width} must be a multiple of 128 on both sides")
    if cfg.opset < 17:
        raise ConfigError(f"opset {cfg.opset} is too old; retinaflow exports opset 17 or newer")
    model, config, _ = load_model(checkpoint, torch.device("cpu"))
    model = model.float().to(memory_format=torch.contiguous_format)
    reference = _Flat(copy.deepcopy(model)).eval()  # the checkpoint as trained: what parity compares with
    fold_batchnorm(model)  # the graph carries plain biased convolutions, no per-BN Mul/Add pairs
    wrapped = _Flat(model).eval()
    levels = LEVELS[: len(config.model.anchors.strides)]
    names = [f"cls_{lv}" for lv in levels] + [f"box_{lv}" for lv in levels]
    example = torch.rand(2, 3, cfg.height, cfg.width) * 255
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}} if cfg.dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            str(out),
            input_names=["images"],
            output_names=names,
            opset_version=cfg.opset,
            dynamic_axes=dynamic,
            dynamo=False,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(out), full_check=True)
    report = check_parity(reference, out, cfg)
    log.info("exported %s (max abs diff %.2e, max rel diff %.2e)", out, report.max_abs, report.max_rel)
    return out


def check_parity(model: torch.nn.Module, path: Path, cfg: ExportConfig, seed: int = 0) -> ParityReport:
    """Compare ONNX Runtime (CPU) with PyTorch on random images at batch 1 and 2.

    Passes when ``|ort - torch| <= ATOL + RTOL * |torch|`` everywhere; raises ExportMismatch otherwise.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependency("parity check needs onnxruntime: pip install 'retinaflow[onnx]'") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    max_abs = max_rel = 0.0
    batches = (1, 2) if cfg.dynamic_batch else (2,)
    for b in batches:
        images = torch.rand(b, 3, cfg.height, cfg.width, generator=gen) * 255
        with torch.no_grad():
            expected = [t.numpy() for t in model(images)]
        got = session.run(None, {"images": images.numpy()})
        for e, g in zip(expected, got, strict=True):
            diff = np.abs(e - g)
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / (np.abs(e) + 1e-6)).max()))
            if not np.all(diff <= ATOL + RTOL * np.abs(e)):
                raise ExportMismatch(
                    f"ONNX Runtime output differs from PyTorch by up to {float(diff.max()):.3g} "
                    f"(tolerance {ATOL} + {RTOL}·|x|) at batch {b}"
                )
    return ParityReport(max_abs=max_abs, max_rel=max_rel, batch_sizes=batches)
