"""A Triton model repository entry for an exported engine: ``DIR/<model>/config.pbtxt`` and
``DIR/<model>/<version>/model.{onnx,pt2}``.

ONNX engines run on Triton's ONNX Runtime backend. Triton's PyTorch backend runs TorchScript only, so a
.pt2 engine is served by the Python backend: ``<version>/model.py`` opens it with
:func:`retinaflow.export.engines.open_engine` (retinaflow and the torch that built it must be installed in
the server's Python). Batching is Triton's dynamic batcher up to the engine's ``max_batch``; that needs
engines whose batch range starts at 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from retinaflow.errors import ConfigError
from retinaflow.export.api import Exported
from retinaflow.export.metadata import read_sidecar, sidecar

_TYPES = {"images": "TYPE_UINT8", "sizes": "TYPE_INT64", "num_detections": "TYPE_INT64"}
_TYPES.update(boxes="TYPE_FP32", scores="TYPE_FP32", classes="TYPE_INT64")

PYTHON_MODEL = '''"""Triton Python backend model serving a retinaflow .pt2 engine (by retinaflow export)."""

from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from retinaflow.export.engines import open_engine

OUTPUTS = ("num_detections", "boxes", "scores", "classes")


class TritonPythonModel:
    def initialize(self, args):
        device = "cuda" if args.get("model_instance_kind") == "GPU" else None
        self.engine = open_engine(Path(__file__).parent / "model.pt2", device)

    def execute(self, requests):
        responses = []
        for request in requests:
            images = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "images").as_numpy())
            sizes = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "sizes").as_numpy())
            d = self.engine(images, sizes)
            values = (d.counts, d.boxes, d.scores, d.classes)
            tensors = [pb_utils.Tensor(n, v.cpu().numpy()) for n, v in zip(OUTPUTS, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def model_config(exported: Exported, name: str, max_det: int) -> str:
    """config.pbtxt text (protobuf text format of Triton's ``ModelConfig``) for ``exported``."""
    spec = exported.spec
    if spec.min_batch != 1:
        raise ConfigError(
            f"Triton batches requests dynamically from 1: re-export with --batch 1 {spec.max_batch}"
        )
    dims = {
        "images": [3, spec.height, spec.width],
        "sizes": [2],
        "num_detections": [1],
        "boxes": [max_det, 4],
        "scores": [max_det],
        "classes": [max_det],
    }
    lines = [f'name: "{name}"']
    if spec.format == "onnx":
        lines += ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"']
    else:
        lines += ['backend: "python"']
    lines.append(f"max_batch_size: {spec.max_batch}")
    for kind, names in (
        ("input", ("images", "sizes")),
        ("output", ("num_detections", "boxes", "scores", "classes")),
    ):
        entries = []
        for n in names:
            reshape = " reshape: { shape: [ ] }" if n == "num_detections" else ""
            shape = ", ".join(map(str, dims[n]))
            entries.append(f'  {{ name: "{n}" data_type: {_TYPES[n]} dims: [ {shape} ]{reshape} }}')
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    preferred = sorted({b for b in (1, spec.max_batch // 2, spec.max_batch) if b >= 1})
    lines.append(
        f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] "
        "max_queue_delay_microseconds: 1000 }"
    )
    kind = "KIND_GPU" if exported.device.startswith("cuda") else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: 1 kind: {kind} }} ]")
    return "\n".join(lines) + "\n"


def write_model_repository(exported: Exported, repo: str | Path, name: str, version: int = 1) -> Path:
    """Write ``repo/name/config.pbtxt`` and ``repo/name/version/`` (the engine); returns ``repo/name``."""
    if exported.spec.format == "onnx":
        from retinaflow.export.onnx import read_metadata

        meta = read_metadata(exported.path)
    else:
        meta = read_sidecar(exported.path)
    max_det = int(meta["infer"]["max_det"])
    entry = Path(repo) / name
    folder = entry / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"model.{exported.spec.format}"
    shutil.copy2(exported.path, target)
    if exported.spec.format == "pt2":
        shutil.copy2(sidecar(exported.path), sidecar(target))
        (folder / "model.py").write_text(PYTHON_MODEL)
    (entry / "config.pbtxt").write_text(model_config(exported, name, max_det))
    return entry
