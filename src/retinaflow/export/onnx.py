"""ONNX export, checked with the ONNX checker and against PyTorch in ONNX Runtime.

End to end (``cfg.postprocess``, the default: serving, Triton): ``images: (batch, 3, H, W) uint8`` RGB and
``sizes: (batch, 2) int64`` (height, width before padding) in; network, decode and NMS in standard ONNX
ops (:mod:`.onnx_postprocess`); ``num_detections (batch,) int64, boxes (batch, D, 4) float32 x1y1x2y2,
scores (batch, D) float32, classes (batch, D) int64`` out. Network only (``postprocess=False``: the
TensorRT plugin route): ``images: (batch, 3, H, W) float32`` RGB 0..255 in, ``cls_p3..cls_p7`` logits and
``box_p3..box_p7`` deltas out. The batch dimension is dynamic in both; the metadata of
:mod:`.metadata` goes into ``metadata_props``. fp16 and int8 (Q/DQ) networks: :mod:`.precision`;
inputs, outputs and decode + NMS are the same in every precision.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinaflow.config import Config, ExportConfig
from retinaflow.engine.infer import load_model
from retinaflow.errors import ConfigError, MissingDependency
from retinaflow.export.detector import EndToEnd, end_to_end_reference
from retinaflow.export.metadata import INPUTS, OUTPUTS, engine_metadata, parse
from retinaflow.export.parity import ExportMismatch, ParityReport, compare_detections
from retinaflow.export.precision import FlatHeads, Lowered, check_network, lower, precision_metadata
from retinaflow.export.spec import EngineSpec, resolve
from retinaflow.model.retinanet import fold_for_inference

log = logging.getLogger(__name__)

LEVELS = ("p3", "p4", "p5", "p6", "p7")
RTOL, ATOL = 1e-3, 1e-3  # ONNX Runtime (CPU, fp32) vs PyTorch fp32, relative to logits of order 1-10


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependency(
            "ONNX export needs onnx and onnxruntime: pip install 'retinaflow[onnx]'"
        ) from exc
    return onnx


def export_onnx(checkpoint: str | Path, output: str | Path, cfg: ExportConfig | None = None) -> Path:
    """Export ``checkpoint`` to ``output`` (.onnx), run the ONNX checker and the parity check.

    ``cfg.postprocess`` chooses the end-to-end graph (default) or the network-only one (see the module
    docstring); size, batch range and precision as :func:`retinaflow.export.spec.resolve` (int8 calibrates
    first: :func:`retinaflow.export.quantize.quantize_for_export`).
    """
    onnx = _require_onnx()
    cfg = cfg or ExportConfig()
    if cfg.opset < 17:
        raise ConfigError(f"opset {cfg.opset} is too old; retinaflow exports opset 17 or newer")
    model, config, state = load_model(checkpoint, torch.device("cpu"))
    spec = resolve(output, cfg, config, "onnx")
    model = model.float().to(memory_format=torch.contiguous_format)
    reference = FlatHeads(copy.deepcopy(model)).eval()  # the checkpoint as trained: fp32 parity's reference
    fold_for_inference(model)  # the graph carries plain biased convolutions, no per-BN Mul/Add pairs
    lowered = lower(model, config, cfg)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.postprocess:
        _export_end_to_end(lowered.model, config, spec, out, cfg.opset)
    else:
        _export_network(FlatHeads(lowered.model).eval(), config, spec, out, cfg.opset)
    meta = {**engine_metadata(checkpoint, state, spec), **precision_metadata(cfg)}
    _finish(onnx, out, meta, config.infer.max_det if cfg.postprocess else 0)
    onnx.checker.check_model(str(out), full_check=True)
    if spec.precision != "fp32":
        report = _check_lowered(lowered, config, spec, out, cfg)
        log.info(
            "exported %s (%s; network within %.2e relative L2 of PyTorch)",
            out,
            spec.precision,
            report.max_rel,
        )
        return out
    if cfg.postprocess:
        report = check_detections(end_to_end_reference(reference.model, config, spec), out, spec)
    else:
        report = check_parity(reference, out, spec)
    log.info("exported %s (max abs diff %.2e, max rel diff %.2e)", out, report.max_abs, report.max_rel)
    return out


def _check_lowered(
    lowered: Lowered, config: Config, spec: EngineSpec, out: Path, cfg: ExportConfig
) -> ParityReport:
    """An fp16/int8 graph: its network against :mod:`.precision`'s reference in norm (an end-to-end graph's
    network is exported alone for it), and the end-to-end graph run once in ONNX Runtime."""
    if not cfg.postprocess:
        return check_network(lowered, str(out), spec)
    with tempfile.TemporaryDirectory() as tmp:
        network = Path(tmp) / "network.onnx"
        _export_network(FlatHeads(lowered.model).eval(), config, spec, network, cfg.opset)
        report = check_network(lowered, str(network), spec)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images, sizes = _example_inputs(spec.min_batch, spec)
    counts, boxes = session.run(
        ["num_detections", "boxes"], {"images": images.numpy(), "sizes": sizes.numpy()}
    )
    if counts.shape != (spec.min_batch,) or not np.isfinite(boxes).all():
        raise ExportMismatch(
            f"the {spec.precision} end-to-end graph gives no valid detections in ONNX Runtime"
        )
    return report


def _export_network(
    wrapped: torch.nn.Module, config: Config, spec: EngineSpec, out: Path, opset: int
) -> None:
    levels = LEVELS[: len(config.model.anchors.strides)]
    names = [f"cls_{lv}" for lv in levels] + [f"box_{lv}" for lv in levels]
    example = torch.rand(2, 3, spec.height, spec.width) * 255
    dynamic = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}} if spec.dynamic_batch else None
    _trace(wrapped, (example,), out, ["images"], names, dynamic, opset)


def _export_end_to_end(
    model: torch.nn.Module, config: Config, spec: EngineSpec, out: Path, opset: int
) -> None:
    wrapped = end_to_end_reference(model, config, spec, onnx_ops=True)
    example = _example_inputs(2 if spec.dynamic_batch else spec.max_batch, spec)
    dynamic = {n: {0: "batch"} for n in (*INPUTS, *OUTPUTS)} if spec.dynamic_batch else None
    _trace(wrapped, example, out, list(INPUTS), list(OUTPUTS), dynamic, opset)


def _trace(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    out: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]] | None,
    opset: int,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(out),
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            dynamic_axes=dynamic,
            dynamo=False,
            do_constant_folding=True,
        )


def _finish(onnx: Any, path: Path, meta: dict[str, str], max_det: int) -> None:
    """Store ``meta`` in ``metadata_props``; with ``max_det``, state the fixed detection dimension of
    the end-to-end outputs (TopK's constant K is not propagated by the exporter)."""
    graph = onnx.load(str(path))
    for output in graph.graph.output if max_det else ():
        if output.name != "num_detections":
            output.type.tensor_type.shape.dim[1].dim_value = max_det
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The parsed retinaflow metadata of an exported ONNX file (empty for other ONNX files)."""
    onnx = _require_onnx()
    graph = onnx.load(str(path), load_external_data=False)
    return parse({p.key: p.value for p in graph.metadata_props})


def _example_inputs(batch: int, spec: EngineSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images (B, 3, H, W) and sizes (B, 2): the first image full size, others smaller."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, spec.height, spec.width), dtype=torch.uint8, generator=gen)
    sizes = torch.tensor([[spec.height, spec.width]] * batch, dtype=torch.int64)
    sizes[1:] = sizes[1:] * 3 // 4
    return images, sizes


def check_parity(model: torch.nn.Module, path: Path, spec: EngineSpec, seed: int = 0) -> ParityReport:
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
    batches = (spec.min_batch, min(spec.max_batch, 2)) if spec.dynamic_batch else (spec.max_batch,)
    for b in batches:
        images = torch.rand(b, 3, spec.height, spec.width, generator=gen) * 255
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


def check_detections(reference: EndToEnd, path: Path, spec: EngineSpec) -> ParityReport:
    """Compare the end-to-end graph in ONNX Runtime (CPU) with ``reference`` (PyTorch, same weights).

    Raises ExportMismatch (see :mod:`.parity` for the tolerances) naming the first image that differs.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependency("parity check needs onnxruntime: pip install 'retinaflow[onnx]'") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = (spec.min_batch, min(spec.max_batch, 2)) if spec.dynamic_batch else (spec.max_batch,)
    worst = 0.0
    for b in dict.fromkeys(batches):
        images, sizes = _example_inputs(b, spec, seed=b)
        with torch.no_grad():
            expected = [t.numpy() for t in reference(images, sizes)]
        got = session.run(None, {"images": images.numpy(), "sizes": sizes.numpy()})
        worst = max(worst, compare_detections(expected, got, f"ONNX Runtime at batch {b}"))
    return ParityReport(max_abs=worst, max_rel=worst, batch_sizes=tuple(batches))
