"""What an exported engine carries so it can be used without its checkpoint.

One flat ``dict[str, str]`` (ONNX ``metadata_props`` need strings): class names and COCO category ids,
input size, layout and normalisation, score/NMS settings, batch range, precision, the retinaflow and
torch versions and the checkpoint's SHA-256. ONNX files hold it in ``metadata_props``; ``.pt2`` packages
compile it in (``aot_inductor.metadata``: ``get_metadata()`` in Python and C++) and get it next to them as
``<engine>.json`` (readable before loading, e.g. to check the torch version).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from retinaflow import __version__
from retinaflow.config import Config, InferConfig
from retinaflow.errors import CheckpointError
from retinaflow.export.spec import EngineSpec
from retinaflow.model.retinanet import IMAGENET_MEAN, IMAGENET_STD

INPUTS = ("images", "sizes")
OUTPUTS = ("num_detections", "boxes", "scores", "classes")
_INFER_KEYS = ("score_thresh", "top_n", "nms_iou", "max_det", "resize", "max_size")


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def engine_metadata(checkpoint: str | Path, state: dict[str, Any], spec: EngineSpec) -> dict[str, str]:
    """The metadata of an engine built from ``checkpoint`` (its loaded ``state``) as ``spec``."""
    config = Config.from_dict(state["config"])
    infer = {k: getattr(config.infer, k) for k in _INFER_KEYS}
    meta: dict[str, Any] = {
        "retinaflow_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "checkpoint_sha256": fingerprint(checkpoint),
        "format": spec.format,
        "precision": spec.precision,
        "input_height": spec.height,
        "input_width": spec.width,
        "min_batch": spec.min_batch,
        "max_batch": spec.max_batch,
        "input_layout": "images: (B, 3, H, W) uint8 RGB, zero-padded bottom/right; sizes: (B, 2) int64 h, w",
        "pixel_mean": list(IMAGENET_MEAN),
        "pixel_std": list(IMAGENET_STD),
        "class_names": list(state.get("class_names") or config.class_names),
        "category_ids": list(state["category_ids"]),
        "infer": infer,
        "inputs": list(INPUTS),
        "outputs": list(OUTPUTS),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def gpu_identity(device: torch.device) -> dict[str, str]:
    """What a CUDA engine records of the GPU it was compiled on and is checked against when loaded: its
    name and compute capability ("9.0")."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def parse(meta: dict[str, str]) -> dict[str, Any]:
    """The typed values of an engine's string metadata (JSON-decoded where they are JSON)."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def infer_config(meta: dict[str, Any]) -> InferConfig:
    """The InferConfig an engine was built with (its resize and score/NMS settings)."""
    cfg = InferConfig()
    for key, value in meta.get("infer", {}).items():
        setattr(cfg, key, value)
    return cfg


def sidecar(engine: str | Path) -> Path:
    """``model.pt2`` -> ``model.json``: the metadata written next to a .pt2 package."""
    return Path(engine).with_suffix(".json")


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    """The parsed metadata next to ``engine``; CheckpointError naming the file when absent."""
    path = sidecar(engine)
    if not path.is_file():
        raise CheckpointError(
            f"{path} (the engine's metadata) is missing: keep it next to {Path(engine).name}, or re-export"
        )
    return parse(json.loads(path.read_text()))
