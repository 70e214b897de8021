"""What an export produces: format (from the output's extension), input size, batch range, precision.

Every default comes from the checkpoint: the input size covers the largest image its inference settings
produce (``infer.max_size``, padded to the network's stride 32) in either orientation, so
``retinaflow export model.pth model.onnx`` always works and the engine accepts every resized image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from retinaflow.config import Config, ExportConfig
from retinaflow.errors import ConfigError

FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".plan": "tensorrt"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: What each format can hold: ONNX Runtime's CPU kernels have no bf16 convolution; int8 is ModelOpt's
#: Q/DQ graph, which ONNX Runtime and TensorRT run and AOTInductor does not compile.
FORMAT_PRECISIONS = {
    "onnx": ("fp32", "fp16", "int8"),
    "pt2": ("fp32", "fp16", "bf16"),
    "tensorrt": ("fp32", "fp16", "int8"),
}
NETWORK_STRIDE = 32  # the backbone's deepest stride; the FPN aligns P6/P7 to any multiple of it


@dataclass(frozen=True)
class EngineSpec:
    """A resolved export request.

    format:    "onnx", "pt2" or "tensorrt".
    height, width: the engine's fixed input size (multiples of 32); images are padded to it.
    min_batch, max_batch: the batch range (equal: a fixed batch).
    precision: network weights/activations "fp32", "fp16", "bf16" or "int8" (Q/DQ); decode + NMS always
        run in fp32.
    """

    format: str
    height: int
    width: int
    min_batch: int
    max_batch: int
    precision: str

    @property
    def dynamic_batch(self) -> bool:
        return self.min_batch != self.max_batch


def engine_format(output: str | Path) -> str:
    """ "onnx", "pt2" or "tensorrt" from ``output``'s extension; ConfigError for anything else."""
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"cannot tell the export format of {Path(output).name!r}: use one of "
            f"{', '.join(FORMATS)} as the output's extension"
        )
    return FORMATS[suffix]


def default_size(config: Config) -> tuple[int, int]:
    """(H, W) covering every image the checkpoint's inference resize produces, either orientation."""
    longest = max(config.infer.max_size, config.infer.resize)
    side = math.ceil(longest / NETWORK_STRIDE) * NETWORK_STRIDE
    return side, side


def resolve(output: str | Path, cfg: ExportConfig, config: Config, fmt: str | None = None) -> EngineSpec:
    """The EngineSpec of exporting a checkpoint with ``config`` to ``output`` under ``cfg``.

    ``fmt`` None: from ``output``'s extension (the exporters pass theirs: pipeline artifact paths have
    none). ``cfg.height``/``cfg.width`` 0 take :func:`default_size`. Raises ConfigError for a size that
    is not a positive multiple of 32, an empty batch range or a precision the format cannot hold.
    """
    fmt = fmt or engine_format(output)
    height, width = cfg.height, cfg.width
    if not height and not width:
        height, width = default_size(config)
    check_size(height, width)
    lo, hi = (cfg.min_batch, cfg.max_batch) if cfg.dynamic_batch else (cfg.max_batch, cfg.max_batch)
    if not 1 <= lo <= hi:
        raise ConfigError(f"batch range {lo}..{hi} is empty: need 1 <= MIN <= MAX")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.precision not in FORMAT_PRECISIONS[fmt]:
        ext = {f: s for s, f in FORMATS.items()}
        others = [ext[f] for f, held in FORMAT_PRECISIONS.items() if cfg.precision in held]
        raise ConfigError(
            f"precision {cfg.precision} is not available for {ext[fmt]} (it holds "
            f"{', '.join(FORMAT_PRECISIONS[fmt])}): export {cfg.precision} as {' or '.join(others)}"
        )
    return EngineSpec(fmt, height, width, lo, hi, cfg.precision)


def check_size(height: int, width: int) -> None:
    """ConfigError unless both sides are positive multiples of the network stride (32)."""
    if height <= 0 or width <= 0 or height % NETWORK_STRIDE or width % NETWORK_STRIDE:
        raise ConfigError(
            f"export size {height}x{width} must be positive multiples of {NETWORK_STRIDE} "
            f"(e.g. --size 800 1344)"
        )
