"""AOTInductor engine (.pt2): the whole detector through ``torch.export``, compiled ahead of time.

The package holds :class:`~retinaflow.export.detector.EndToEnd` (uint8 images + sizes in, fixed-size
detections out) with batch norms folded and weights in the requested precision, compiled for one device
(CPU: C++ via the host compiler; CUDA: Triton kernels, a GroupNorm head's two subnets as one grouped tower
(:class:`~retinaflow.model.head.MergedHead`), the stem reading 4 channels (the fourth zero,
:func:`~retinaflow.model.retinanet.pad_stem_input`), and with ``fuse_epilogues`` channels_last weights and the
convolutions' bias + ReLU (+ residual) epilogues in cuDNN where that is faster on this GPU, :mod:`.fuse`)
with ``torch._inductor.aoti_compile_and_package``.
Decode and NMS stay calls of ``torch.ops.retinaflow.*``: whoever loads the package registers them first
(:mod:`retinaflow.export.engines` in Python; the C++ runner links the kernels library). Its metadata
(:mod:`.metadata`) is compiled in (``get_metadata()``) and written next to it as ``<name>.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from retinaflow.config import ExportConfig
from retinaflow.engine.infer import load_model, prepare_for_inference
from retinaflow.errors import ConfigError
from retinaflow.export.detector import EndToEnd, end_to_end_reference
from retinaflow.export.fuse import faster_on, fuse_conv_activations
from retinaflow.export.metadata import engine_metadata, gpu_identity, sidecar
from retinaflow.export.spec import EngineSpec, resolve
from retinaflow.model.head import MergedHead
from retinaflow.model.retinanet import pad_stem_input

log = logging.getLogger(__name__)

# input channels of a CUDA engine's stem convolution (model.retinanet.pad_stem_input)
STEM_CHANNELS = 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_pt2(
    checkpoint: str | Path, output: str | Path, cfg: ExportConfig, device: str | None = None
) -> Path:
    """Export ``checkpoint`` as an AOTInductor package at ``output`` (.pt2) compiled for ``device``.

    ``device``: "cpu", "cuda" or "cuda:N" (default: cuda if present). Writes ``output`` and its metadata
    ``output.with_suffix('.json')``; returns ``output``.
    """
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"cannot compile a .pt2 for {dev}: no CUDA device here (use --device cpu)")
    model, config, state = load_model(checkpoint, dev)
    spec = resolve(output, cfg, config, "pt2")
    prepare_for_inference(model, DTYPES[spec.precision] if spec.precision != "fp32" else None)
    if dev.type == "cuda":
        assert not isinstance(model.head, MergedHead)  # a loaded model's head, folded
        if any(isinstance(m, torch.nn.GroupNorm) for m in model.head.modules()):
            # half the GroupNorm kernels: -0.1 ms at batch 1 on an H100, the same at batch 32. Without
            # norms (folded BatchNorms, ODTK's head) the grouped convs cost more than they save.
            model.head = MergedHead(model.head)
        pad_stem_input(model, STEM_CHANNELS)
    module = end_to_end_reference(model, config, spec)
    meta = {**engine_metadata(checkpoint, state, spec), "device": dev.type}
    if dev.type == "cuda":  # its kernels run on this architecture only (checked when it is loaded)
        meta.update(gpu_identity(dev))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if dev.type == "cuda":
        from retinaflow.ops import _ext

        _ext.load()  # the CUDA impls of the retinaflow ops must be registered before export
    fuse = dev.type == "cuda" and cfg.fuse_epilogues
    if fuse:  # weights NHWC: the fused ops' fast fp16/bf16 layout (inductor picks its own otherwise)
        module.to(memory_format=torch.channels_last)
    program = export_program(module, spec, dev)
    if fuse:
        batches = tuple(sorted({spec.min_batch, spec.max_batch}))  # timed at both ends of the range
        program, fused = fuse_conv_activations(program, keep=faster_on(dev, batches))
        log.info(
            "cuDNN epilogues: %d conv+ReLU, %d conv+add+ReLU (%d left to inductor: slower fused)",
            fused.conv_relu,
            fused.conv_add_relu,
            fused.left,
        )
    log.info("compiling %s with AOTInductor for %s (minutes for a large network)", out.name, dev)
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(out), inductor_configs={"aot_inductor.metadata": meta}
    )
    sidecar(out).write_text(json.dumps(meta, indent=1))
    return out


def export_program(
    module: EndToEnd, spec: EngineSpec, device: torch.device, example_batch: int | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` with a dynamic batch dimension when ``spec`` has a range.

    ``example_batch`` (default: the largest) is the batch of the example input. Inductor picks its
    kernels' configurations (persistent or looped reductions, block sizes) for the example's sizes, and
    the largest batch is where throughput counts.
    """
    batch = min(max(example_batch or spec.max_batch, spec.min_batch), spec.max_batch)
    images = torch.zeros(batch, 3, spec.height, spec.width, dtype=torch.uint8, device=device)
    sizes = torch.tensor([[spec.height, spec.width]] * batch, dtype=torch.int64, device=device)
    dynamic = None
    if spec.dynamic_batch:
        dim = torch.export.Dim("batch", min=spec.min_batch, max=spec.max_batch)
        dynamic = {"images": {0: dim}, "sizes": {0: dim}}
    with torch.no_grad():
        return torch.export.export(module, (images, sizes), dynamic_shapes=dynamic)
