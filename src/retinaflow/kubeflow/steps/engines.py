"""Deployable engines in the pipeline: build_engine compiles the .pt2 (GPU nodes; skipped with the reason
elsewhere), evaluate measures every built engine (COCO mAP, batch-1 latency) against the PyTorch model.

The build_engine artifact folder holds ``engines.json``: one record per engine (``built``, ``reason``,
``file``, ``tags``: precision, batch range, GPU, versions), next to the engines themselves.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from retinaflow import __version__

log = logging.getLogger(__name__)

ENGINES_FILE = "engines.json"
PT2_FILE = "model.pt2"
PT2_PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "fp16"}  # int8 is TensorRT's
MAX_BATCH = 8


@dataclass
class EngineRecord:
    """One engine of a build_engine artifact; ``file`` is relative to the artifact folder."""

    name: str
    built: bool
    reason: str
    file: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def build_pt2_engine(checkpoint: str | Path, out_dir: str | Path, precision: str, size: int) -> EngineRecord:
    """Compile ``checkpoint`` to ``out_dir/model.pt2`` for this node's GPU; a skipped record without one."""
    if not torch.cuda.is_available():
        return EngineRecord("pt2", False, "no CUDA device on this node: .pt2 engines compile for their GPU")
    from retinaflow.config import ExportConfig
    from retinaflow.export.aoti import export_pt2

    dtype = PT2_PRECISIONS.get(precision, "fp16")
    cfg = ExportConfig(height=size, width=size, precision=dtype, min_batch=1, max_batch=MAX_BATCH)
    path = export_pt2(checkpoint, Path(out_dir) / PT2_FILE, cfg, device="cuda")
    tags = {
        "precision": dtype,
        "batch_range": f"1-{MAX_BATCH}",
        "input_size": f"{size}x{size}",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "retinaflow": __version__,
    }
    return EngineRecord("pt2", True, f"built for {tags['gpu']} ({dtype})", path.name, tags)


def write_records(out_dir: str | Path, records: list[EngineRecord]) -> None:
    Path(out_dir, ENGINES_FILE).write_text(json.dumps([asdict(r) for r in records], indent=1))


def read_records(engine_dir: str | Path) -> list[EngineRecord]:
    """The records of a build_engine artifact (none for an artifact written before engines.json)."""
    path = Path(engine_dir) / ENGINES_FILE
    return [EngineRecord(**r) for r in json.loads(path.read_text())] if path.is_file() else []


def batch1_latency_ms(engine_path: str | Path, iters: int = 20) -> float:
    """Median milliseconds of one batch-1 call (uint8 image already on the engine's device, detections
    back on the host)."""
    from retinaflow.export.engines import open_engine

    engine = open_engine(engine_path)
    h, w = engine.input_hw
    images = torch.zeros(1, 3, h, w, dtype=torch.uint8, device=engine.device)
    sizes = torch.tensor([[h, w]], device=engine.device)
    samples = []
    for i in range(iters + 3):
        t0 = time.perf_counter()
        engine(images, sizes).counts.cpu()
        if i >= 3:  # warm-up first
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def evaluate_engine(
    engine_path: str | Path, images: str | Path, annotations: str | Path, output: str | Path
) -> dict[str, Any]:
    """COCO statistics (``AP``...) and ``latency_ms`` of one engine on the validation set."""
    from retinaflow.export.engine_infer import infer_engine

    result = infer_engine(engine_path, images, output, annotations)
    assert result is not None  # annotations given
    return {**result.stats, "latency_ms": batch1_latency_ms(engine_path)}


def build_engines(
    checkpoint: str | Path, onnx_path: str | Path, out_dir: str | Path, enabled: bool, precision: str
) -> Any:
    """build_engine's step: the TensorRT engine (see packaging.build_trt_engine) and the .pt2, into
    ``out_dir`` with ``engines.json``; returns the TensorRT EngineResult (the step's outputs)."""
    from retinaflow.kubeflow.steps.packaging import build_trt_engine, export_size

    trt = build_trt_engine(checkpoint, out_dir, enabled=enabled, precision=precision)
    pt2 = build_pt2_engine(checkpoint, out_dir, precision, export_size(checkpoint, 0))
    if not pt2.built:
        log.warning(".pt2 engine not built: %s", pt2.reason)
    write_records(out_dir, [pt2])
    return trt
