"""INT8 post-training quantization with NVIDIA ModelOpt (``nvidia-modelopt``, the ``quantize`` extra).

:func:`quantize` inserts ModelOpt's fake quantizers (``mtq.quantize`` with ``mtq.INT8_DEFAULT_CFG``: int8
per-channel weights, per-tensor activations, ``max`` calibration) and calibrates them on
``calibration_images`` images drawn (seeded) from the training set; the result is still a PyTorch model
(evaluate it as usual). :func:`export_qdq_onnx` writes it as an explicit-precision ONNX graph
(QuantizeLinear/DequantizeLinear pairs), which ONNX Runtime (CPU) runs and TensorRT builds as a strongly
typed INT8 network. ``QuantizeConfig.keep`` leaves modules unquantized, e.g. :data:`HEAD_LAST_CONVS`.
:func:`quantize_for_export` is what ``retinaflow export --precision int8`` runs (an ExportConfig in).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import Config, DataConfig, ExportConfig
from retinaflow.errors import ConfigError, DataError, MissingDependency

log = logging.getLogger(__name__)

# The head's last convolutions (class logits and box deltas): the layers most sensitive to int8.
HEAD_LAST_CONVS = ("*head.cls_logits*", "*head.box_pred*")


class CalibrationError(DataError):
    """The calibration set has fewer usable images than asked for."""


@dataclass
class QuantizeConfig:
    """Post-training quantization settings."""

    calibration_images: int = 512
    seed: int = 0
    batch: int = 8
    keep: tuple[str, ...] = ()  # quantizer name patterns left in floating point (fnmatch style)


def modelopt() -> Any:
    """``modelopt.torch.quantization``, or MissingDependency saying how to get it."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise MissingDependency(
            f"INT8 quantization needs NVIDIA ModelOpt ({exc}): pip install 'retinaflow[quantize]'"
        ) from exc
    return mtq


def calibration_batches(
    images: str | Path, annotations: str | Path, data: DataConfig, cfg: QuantizeConfig
) -> list[torch.Tensor]:
    """``cfg.calibration_images`` training images, drawn with ``cfg.seed``, resized as for inference.

    Returns batches of (B, 3, H, W) float32 RGB 0..255 (zero-padded to ``data.pad_stride``). Raises
    CalibrationError when the set is smaller than asked (no silent shrinking of the calibration).
    """
    from retinaflow.data.coco import CocoDataset
    from retinaflow.data.loader import collate
    from retinaflow.data.transforms import EvalTransform

    if cfg.calibration_images < 1 or cfg.batch < 1:
        raise CalibrationError(
            f"calibration needs >= 1 image and batch, got {cfg.calibration_images}/{cfg.batch}"
        )
    transform = EvalTransform(data.resize, data.max_size)
    dataset = CocoDataset(images, annotations, transform, replace_corrupt=False, require_annotations=False)
    if len(dataset) < cfg.calibration_images:
        raise CalibrationError(
            f"calibration asks for {cfg.calibration_images} images but {annotations} lists only "
            f"{len(dataset)}: "
            "lower calibration_images or point at the full training set"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = order[: cfg.calibration_images].tolist()
    batches = []
    for start in range(0, len(chosen), cfg.batch):
        samples = [dataset[i] for i in chosen[start : start + cfg.batch]]
        batches.append(collate(samples, data.pad_stride).images.float())
    usable = sum(int(b.shape[0]) for b in batches)
    if usable < cfg.calibration_images:
        raise CalibrationError(
            f"only {usable} of the {cfg.calibration_images} calibration images drawn could be decoded"
        )
    return batches


def quantize(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], cfg: QuantizeConfig | None = None
) -> torch.nn.Module:
    """Insert and calibrate int8 fake quantizers in ``model`` (in place, eval mode); returns it.

    batches: calibration images (B, 3, H, W) float RGB 0..255, moved to the model's device.
    """
    mtq = modelopt()
    cfg = cfg or QuantizeConfig()
    qcfg = int8_config(mtq, cfg.keep)
    device = next(model.parameters()).device
    data = list(batches)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for images in data:
                m(images.to(device))

    model.eval()
    mtq.quantize(model, qcfg, forward_loop)
    log.info(
        "quantized to int8 with %d calibration batches (kept in float: %s)", len(data), cfg.keep or "none"
    )
    return model


def quantize_for_export(model: torch.nn.Module, config: Config, cfg: ExportConfig) -> torch.nn.Module:
    """:func:`quantize` ``model`` (a checkpoint's network, ``config`` its config) as ``cfg`` asks.

    ``cfg.calibration_images`` images from :func:`calibration_source`, resized and padded as the
    checkpoint's inference does; ``cfg.int8_keep_head`` keeps :data:`HEAD_LAST_CONVS` in float.
    ModelOpt is checked first, so a machine without it fails before any image is read.
    """
    modelopt()
    images, annotations = calibration_source(config, cfg)
    infer = config.infer
    data = dataclasses.replace(
        config.data, resize=infer.resize, max_size=infer.max_size, pad_stride=infer.pad_stride
    )
    keep = HEAD_LAST_CONVS if cfg.int8_keep_head else ()
    qcfg = QuantizeConfig(calibration_images=cfg.calibration_images, keep=keep)
    return quantize(model, calibration_batches(images, annotations, data, qcfg), qcfg)


def calibration_source(config: Config, cfg: ExportConfig) -> tuple[str, str]:
    """(images folder, COCO JSON) to calibrate on: ``cfg.calibration_data``, else the training data the
    checkpoint's ``config`` names; ConfigError when neither is there."""
    if cfg.calibration_data:
        images, annotations = cfg.calibration_data
        return images, annotations
    if config.data.images and config.data.annotations:
        return config.data.images, config.data.annotations
    raise ConfigError(
        "int8 export needs calibration images and the checkpoint names no training data: "
        "pass --calibration-data IMAGES ANNOTATIONS"
    )


def int8_config(mtq: Any, keep: Iterable[str]) -> dict[str, Any]:
    """``INT8_DEFAULT_CFG`` with the quantizers matching ``keep`` disabled (both ModelOpt config layouts)."""
    qcfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    rules = qcfg["quant_cfg"]
    for pattern in keep:
        if isinstance(rules, list):  # ModelOpt >= 0.4x: ordered rules, later ones win
            rules.append({"quantizer_name": pattern, "enable": False})
        else:
            rules[pattern] = {"enable": False}
    return qcfg


def export_qdq_onnx(
    model: torch.nn.Module, output: str | Path, height: int, width: int, opset: int = 17
) -> Path:
    """Write a quantized model (:func:`quantize`) as ONNX with explicit Q/DQ nodes.

    Same interface as :func:`retinaflow.export.onnx.export_onnx`'s graph: ``images (batch, 3, H, W)`` in,
    ``cls_*`` then ``box_*`` per level out, dynamic batch.
    """
    from retinaflow.export.onnx import LEVELS
    from retinaflow.export.precision import FlatHeads

    wrapped = FlatHeads(model).eval()
    with torch.no_grad():
        levels = len(model(torch.zeros(1, 3, height, width, device=_device(model)))[0])
    names = [f"{k}_{lv}" for k in ("cls", "box") for lv in LEVELS[:levels]]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, height, width, device=_device(model)) * 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            str(out),
            input_names=["images"],
            output_names=names,
            opset_version=opset,
            dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            dynamo=False,
            do_constant_folding=True,
        )
    return out


def count_qdq(path: str | Path) -> int:
    """Number of QuantizeLinear nodes in an ONNX file (0 means the export lost the quantization)."""
    import onnx

    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
