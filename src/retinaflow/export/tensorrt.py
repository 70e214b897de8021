"""TensorRT engines (.plan) from the plugin-flavour ONNX, and a detector that runs them.

:func:`build_engine` parses the plugin-flavour ONNX (:mod:`retinaflow.export.plugin_onnx`) into a strongly
typed network (precision comes from the graph: float32, float16 via :func:`to_float16`, or int8 Q/DQ from
:mod:`retinaflow.export.quantize`), with the plugin library (:mod:`retinaflow.export.trt_plugins`) loaded,
one optimisation profile over the batch range, a persistent timing cache and a workspace limit. Next to the
plan it writes ``<plan>.json``: the TensorRT version, GPU and shapes it was built for, checked before a plan
is deserialised (:class:`PlanMismatch`). :class:`TensorRTDetector` runs a plan asynchronously on the current
CUDA stream with torch tensors as buffers and returns the PyTorch path's :class:`Detections`.
TensorRT 10 and 11: 11 builds only strongly typed networks (the creation flag is set where it exists).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import ExportConfig
from retinaflow.errors import ConfigError, MissingDependency, RetinaflowError
from retinaflow.export import plugin_onnx
from retinaflow.export.trt_plugins import HOW_TO
from retinaflow.ops.detections import Detections

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


class EngineBuildError(RetinaflowError):
    """TensorRT could not parse the ONNX or build the engine."""


class PlanMismatch(RetinaflowError):
    """A .plan built by another TensorRT version or for another GPU."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or MissingDependency with a one-line how-to."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependency(f"TensorRT is not installed: {HOW_TO}") from exc
    return trt


def export_plan(checkpoint: str | Path, output: str | Path, cfg: ExportConfig) -> Path:
    """``retinaflow export model.pth engine.plan``: the plugin-flavour ONNX (kept next to the plan as
    ``<name>.plugin.onnx``), then the engine over ``cfg``'s batch range and size. TensorRT is checked first,
    so a machine without it fails in a second, before any export work.

    int8: the ONNX carries the calibrated Q/DQ network (:mod:`.precision`); fp16: it is fp32 and
    :func:`build_engine` casts it (:func:`to_float16`, which keeps the plugins' I/O in float32).
    """
    require_tensorrt()
    from retinaflow.config import Config
    from retinaflow.engine.checkpoint import load_checkpoint
    from retinaflow.export.metadata import engine_metadata, parse
    from retinaflow.export.spec import resolve

    state = load_checkpoint(checkpoint)
    spec = resolve(output, cfg, Config.from_dict(state["config"]), "tensorrt")
    meta = {**parse(engine_metadata(checkpoint, state, spec)), "outputs": list(plugin_onnx.GRAPH_OUTPUTS)}
    onnx_cfg = replace(cfg, precision="fp32") if cfg.precision == "fp16" else cfg
    onnx_path = Path(output).with_suffix(".plugin.onnx")
    plugin_onnx.export_plugin_onnx(checkpoint, onnx_path, onnx_cfg)
    return build_engine(onnx_path, output, cfg, meta)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    cfg: ExportConfig | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Build ``plan_path`` (.plan) from a plugin-flavour ONNX; returns it (and writes ``<plan>.json``:
    what the plan is tied to (:func:`plan_environment`), its input size and build settings, and
    ``metadata``: :func:`export_plan` adds the engine metadata (:mod:`retinaflow.export.metadata`) that
    ``retinaflow infer model.plan`` reads).

    ``cfg.precision`` int8 needs a Q/DQ graph (``export_plugin_onnx`` with int8): strongly typed, TensorRT
    takes int8 from the QuantizeLinear/DequantizeLinear nodes (no builder flag, no calibrator).
    """
    cfg = cfg or ExportConfig(precision="fp16")
    _check(cfg)
    onnx = plugin_onnx._onnx()
    model = onnx.load(str(onnx_path))
    plugin_onnx.find_plugin_nodes(model)  # MissingPluginNodes before TensorRT is even needed
    height, width = _input_hw(model)
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if (cfg.precision == "int8") != quantized:
        raise ConfigError(
            f"{onnx_path} {'has' if quantized else 'has no'} Q/DQ nodes but the engine is to be "
            f"{cfg.precision}: export the plugin ONNX with the engine's precision (int8 only with Q/DQ)"
        )
    trt = require_tensorrt()
    from retinaflow.export import trt_plugins

    trt_plugins.load()
    if cfg.precision == "fp16":
        model = to_float16(model)
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(Path(onnx_path).resolve())):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gib * (1 << 30)))
    config.builder_optimization_level = cfg.optimization_level
    profile = builder.create_optimization_profile()
    batches = (cfg.min_batch, cfg.opt_batch or cfg.max_batch, cfg.max_batch)
    profile.set_shape("images", *[(b, 3, height, width) for b in batches])
    profile.set_shape("sizes", *[(b, 2) for b in batches])
    config.add_optimization_profile(profile)
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
    cache = config.create_timing_cache(
        cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build {onnx_path}: {logger.last_error or 'see the log'}")
    out = Path(plan_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(plan))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {**(metadata or {}), **plan_environment(trt), "height": height, "width": width}
    meta["config"] = asdict(cfg)
    meta_path(out).write_text(json.dumps(meta, indent=2))
    log.info(
        "built %s (%s, batch %d..%d, %dx%d)", out, cfg.precision, cfg.min_batch, cfg.max_batch, height, width
    )
    return out


def to_float16(model: Any) -> Any:
    """The graph with float16 weights and activations (inputs, outputs and plugin I/O stay float32)."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise MissingDependency(
            f"fp16 engines need onnxconverter-common to cast the graph: {HOW_TO}"
        ) from exc
    block = [plugin_onnx.DECODE_OP, plugin_onnx.NMS_OP]
    return float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)


def meta_path(plan: str | Path) -> Path:
    return Path(f"{plan}.json")


def plan_environment(trt: Any) -> dict[str, Any]:
    """What a plan is tied to: TensorRT version, GPU name and compute capability, plugin version."""
    major, minor = torch.cuda.get_device_capability()
    return {
        "tensorrt": str(trt.__version__),
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "plugin_version": plugin_onnx.PLUGIN_VERSION,
    }


def check_plan(meta: dict[str, Any], here: dict[str, Any], plan: str | Path) -> None:
    """PlanMismatch when the plan was built by another TensorRT, for another GPU or another plugin version."""
    for key, what in (
        ("tensorrt", "TensorRT"),
        ("compute_capability", "compute capability"),
        ("plugin_version", "plugin version"),
    ):
        if str(meta.get(key)) != str(here[key]):
            raise PlanMismatch(
                f"{plan} was built with {what} {meta.get(key)} ({meta.get('gpu')}), this is {here[key]} "
                f"({here['gpu']}): rebuild it here with retinaflow.export.tensorrt.build_engine"
            )


class TensorRTDetector:
    """``detector(images, sizes) -> Detections`` over a .plan, on CUDA tensors.

    images: (B, 3, h, w) uint8/float RGB 0..255 with h, w <= the plan's size (zero-padded bottom/right);
    sizes: (B, 2) (height, width) before padding. Batches beyond the profile's max run in chunks.
    Returns Detections (B, max_det) like :func:`retinaflow.engine.infer.detect`: int64 classes and counts.
    """

    def __init__(self, plan_path: str | Path) -> None:
        trt = require_tensorrt()
        from retinaflow.export import trt_plugins

        trt_plugins.load()
        plan = Path(plan_path)
        if not plan.is_file():
            raise ConfigError(f"TensorRT plan not found: {plan}")
        meta = json.loads(meta_path(plan).read_text()) if meta_path(plan).is_file() else None
        if meta is not None:
            check_plan(meta, plan_environment(trt), plan)
        self.logger = _Logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise PlanMismatch(
                f"TensorRT could not load {plan}: {self.logger.last_error or 'incompatible plan'}"
            )
        self.context = self.engine.create_execution_context()
        shape = self.engine.get_tensor_profile_shape("images", 0)
        self.max_batch, (_, _, self.height, self.width) = int(shape[2][0]), tuple(shape[2])
        self.trt = trt

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, sizes: torch.Tensor) -> Detections:
        parts = [
            self._run(images[i : i + self.max_batch], sizes[i : i + self.max_batch])
            for i in range(0, images.shape[0], self.max_batch)
        ]
        return Detections(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("scores", "boxes", "classes", "counts"))
        )

    def _run(self, images: torch.Tensor, sizes: torch.Tensor) -> Detections:
        h, w = images.shape[-2:]
        if h > self.height or w > self.width:
            raise ConfigError(f"a {h}x{w} batch does not fit the plan's {self.height}x{self.width} input")
        inputs = {
            "images": torch.nn.functional.pad(
                images.float(), (0, self.width - w, 0, self.height - h)
            ).contiguous(),
            "sizes": sizes.to(device=images.device, dtype=torch.int32).contiguous(),
        }
        for name, t in inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in plugin_onnx.GRAPH_OUTPUTS:
            dtype = torch.int32 if name in ("classes", "counts") else torch.float32
            t = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=images.device)
            self.context.set_tensor_address(name, t.data_ptr())
            outputs[name] = t
        stream = torch.cuda.current_stream(images.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError(f"TensorRT execution failed: {self.logger.last_error or 'see the log'}")
        return Detections(
            outputs["scores"], outputs["boxes"], outputs["classes"].long(), outputs["counts"].long()
        )


def _check(cfg: ExportConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"engine precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    opt = cfg.opt_batch or cfg.max_batch
    if not 1 <= cfg.min_batch <= opt <= cfg.max_batch:
        raise ConfigError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {cfg.min_batch}/{opt}/{cfg.max_batch}"
        )


def _input_hw(model: Any) -> tuple[int, int]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not (dims[2].dim_value and dims[3].dim_value):
        raise ConfigError("the plugin ONNX input must be (batch, 3, H, W) with a fixed H and W")
    return int(dims[2].dim_value), int(dims[3].dim_value)


class _Logger:
    """A TensorRT logger that forwards to ``logging`` and remembers the last error (for one-line errors)."""

    def __new__(cls, trt: Any) -> Any:
        class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.last_error = ""

            def log(self, severity: Any, msg: str) -> None:
                if severity <= trt.ILogger.Severity.ERROR:
                    self.last_error = msg
                    log.error("TensorRT: %s", msg)
                elif severity <= trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)

        return Logger()
