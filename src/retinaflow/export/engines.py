"""Open and run exported engines (.pt2 packages, end-to-end .onnx graphs, TensorRT .plan files) like
the PyTorch detector.

``open_engine(path)`` checks the file before handing it to its runtime and turns every way it can be
unusable (another format, truncated, another torch version, missing kernels) into one :class:`EngineError`
line saying what to do. An engine is called with ``images: (B, 3, H, W) uint8`` at its input size and
``sizes: (B, 2) int64`` and returns :class:`~retinaflow.ops.detections.Detections` (B, max_det).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from retinaflow.errors import CheckpointError, ConfigError, MissingDependency, first_line
from retinaflow.export.metadata import OUTPUTS, gpu_identity, parse, read_sidecar, sidecar
from retinaflow.ops.detections import Detections

SUFFIXES = (".pt2", ".onnx", ".plan")


class EngineError(CheckpointError):
    """An engine file that cannot be used here (format, truncation, torch version, kernels)."""


def is_engine(path: str | Path) -> bool:
    """True for the file names ``retinaflow infer`` runs as engines (.pt2, .onnx, .plan)."""
    return Path(str(path)).suffix.lower() in SUFFIXES


class Engine:
    """A loaded engine: ``meta`` (see :mod:`.metadata`), ``device`` and ``__call__(images, sizes)``."""

    def __init__(self, path: Path, meta: dict[str, Any], device: torch.device) -> None:
        self.path, self.meta, self.device = path, meta, device

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.meta["input_height"]), int(self.meta["input_width"])

    def check(self, images: torch.Tensor, sizes: torch.Tensor) -> None:
        """ConfigError when ``images`` do not fit the engine's size, dtype or batch range."""
        lo, hi = int(self.meta["min_batch"]), int(self.meta["max_batch"])
        h, w = self.input_hw
        name = self.path.name
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ConfigError(
                f"{name} takes images (B, 3, {h}, {w}), got {tuple(images.shape)}: pad (bottom/right) or "
                f"resize to {h}x{w}, or re-export with --size {images.shape[-2]} {images.shape[-1]}"
            )
        if images.dtype != torch.uint8:
            raise ConfigError(f"{name} takes uint8 images, got {images.dtype}")
        if not lo <= images.shape[0] <= hi:
            raise ConfigError(
                f"batch of {images.shape[0]} is outside {name}'s range {lo}..{hi}: use --batch {hi} or "
                f"re-export with --batch {lo} {images.shape[0]}"
            )
        if tuple(sizes.shape) != (images.shape[0], 2):
            raise ConfigError(f"sizes must be ({images.shape[0]}, 2), got {tuple(sizes.shape)}")

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor) -> Detections:
        self.check(images, sizes)
        counts, boxes, scores, classes = self.run(images, sizes.to(torch.int64))
        return Detections(scores.float(), boxes.float(), classes.long(), counts.long())

    def run(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class Pt2Engine(Engine):
    """An AOTInductor package, run by its C++ loader (see :func:`load_pt2_runner`).

    ``cuda_graph``: on a CUDA device, each batch size is captured once as a CUDA graph and replayed (the
    package launches its kernels one by one; a graph launches them all at once, which is what batch-1
    latency needs). The runner is then single-threaded (its multi-threaded mode waits on events, which a
    capture does not allow); outputs are copied out of the graph's static buffers.
    """

    def __init__(self, path: Path, device: str | None, cuda_graph: bool = False) -> None:
        meta = _pt2_preflight(path)
        dev = torch.device(device or meta.get("device", "cpu"))
        if meta.get("device") and dev.type != meta["device"]:
            raise EngineError(
                f"{path.name} was compiled for {meta['device']}, not {dev.type}: run it there or re-export "
                f"with --device {dev.type}"
            )
        _check_gpu(meta, path, dev)
        _register_ops(dev, path)
        self.graphs: dict[int, Any] | None = {} if cuda_graph and dev.type == "cuda" else None
        try:
            index = (dev.index or 0) if dev.type == "cuda" else -1
            self.runner = load_pt2_runner(path, index, single_threaded=self.graphs is not None)
        except Exception as exc:  # the loader's errors are long C++ traces: one line and the fix
            raise EngineError(f"cannot load {path.name} ({first_line(exc)}): re-export it") from exc
        meta = {**meta, **parse(dict(self.runner.get_metadata()))}
        _check_torch_version(meta, path)  # also when the sidecar was not copied along
        _check_gpu(meta, path, dev)
        super().__init__(path, meta, dev)

    def run(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # contiguous: the package's kernels assume the strides of the example it was traced with
        inputs = [images.to(self.device).contiguous(), sizes.to(self.device).contiguous()]
        with torch.no_grad():
            if self.graphs is None:
                return tuple(self.runner.run(inputs))
            from retinaflow.ops.graph import CudaGraphRunner

            graph = self.graphs.get(images.shape[0])
            if graph is None:
                run = lambda *tensors: self.runner.run(list(tensors))  # noqa: E731
                graph = self.graphs[images.shape[0]] = CudaGraphRunner(run, inputs)
            return tuple(t.clone() for t in graph(*inputs))


class OnnxEngine(Engine):
    """An end-to-end ONNX graph in ONNX Runtime (CUDA provider for a CUDA device, else CPU)."""

    def __init__(self, path: Path, device: str | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependency("ONNX engines need onnxruntime: pip install 'retinaflow[onnx]'") from exc
        dev = torch.device(device or "cpu")
        providers = ["CUDAExecutionProvider"] if dev.type == "cuda" else []
        try:
            self.session = ort.InferenceSession(str(path), providers=[*providers, "CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(f"{path.name} is not a loadable ONNX model ({first_line(exc)})") from exc
        names = [o.name for o in self.session.get_outputs()]
        if names != list(OUTPUTS):
            raise EngineError(
                f"{path.name} is a network-only ONNX (outputs {names[:2]}...): decode it with the checkpoint "
                "(pipeline evaluate) or re-export without --no-postprocess"
            )
        meta = parse(dict(self.session.get_modelmeta().custom_metadata_map))
        super().__init__(path, meta, dev)

    def run(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {"images": images.cpu().numpy(), "sizes": sizes.cpu().numpy()}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))


def open_engine(path: str | Path, device: str | None = None, cuda_graph: bool = False) -> Engine:
    """Load the engine at ``path`` (.pt2, .onnx or .plan) for ``device`` (default: the one it was built for);
    ``cuda_graph``: replay a .pt2 engine on CUDA from CUDA graphs (:class:`Pt2Engine`)."""
    p = Path(path)
    if not p.is_file():
        raise EngineError(f"engine not found: {p}")
    suffix = p.suffix.lower() or (".pt2" if zipfile.is_zipfile(p) else ".onnx")  # pipeline artifacts
    if suffix == ".pt2":
        return Pt2Engine(p, device, cuda_graph)
    if suffix == ".onnx":
        return OnnxEngine(p, device)
    if suffix == ".plan":
        return PlanEngine(p, device)
    raise EngineError(f"{p.name}: not an engine retinaflow runs (use a .pt2, .onnx or .plan export)")


class PlanEngine(Engine):
    """A TensorRT plan (``retinaflow export model.pth model.plan``) on a CUDA device, run by
    :class:`~retinaflow.export.tensorrt.TensorRTDetector`; its metadata is ``<plan>.json``, written by
    the export. Needs TensorRT and the plugin library (the export image: ``dockerfiles/export.Dockerfile``).
    """

    def __init__(self, path: Path, device: str | None) -> None:
        from retinaflow.export.tensorrt import TensorRTDetector, meta_path, require_tensorrt

        require_tensorrt()  # first: without it nothing else matters
        meta_file = meta_path(path)
        if not meta_file.is_file():
            raise EngineError(
                f"{meta_file.name} (the plan's metadata) is missing: keep it next to {path.name} or re-export"
            )
        meta = json.loads(meta_file.read_text())
        if "class_names" not in meta:
            raise EngineError(
                f"{path.name} has no class names or resize settings (built by build_engine from an ONNX): "
                f"re-export it with retinaflow export model.pth {path.name}"
            )
        dev = torch.device(device or "cuda")
        if dev.type != "cuda":
            raise EngineError(f"{path.name} is a TensorRT engine: it runs on a CUDA device, not {dev.type}")
        with torch.cuda.device(dev):
            self.detector = TensorRTDetector(path)
        super().__init__(path, meta, dev)

    def run(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.cuda.device(self.device):
            d = self.detector(images.to(self.device), sizes.to(self.device))
        return d.counts, d.boxes, d.scores, d.classes


def load_pt2_runner(path: Path, device_index: int, single_threaded: bool = False) -> Any:
    """The package's C++ runner (``AOTIModelPackageLoader``: ``run(list of tensors)``, ``get_metadata()``)
    for ``device_index`` (-1: CPU), loaded as a C++ program loads it; ``single_threaded`` for callers
    that never run it from two threads at once (needed under CUDA-graph capture).

    Not ``torch._inductor.aoti_load_package``, which wraps the same loader but first reads the package's
    device information (compiling test programs to pick the CPU's vector ISA: tens of seconds in a fresh
    process on the GPU machines) and, on any RuntimeError, loads the package a second time. libtorch's
    libraries are made global first (:func:`_torch_libraries_global`).
    """
    _torch_libraries_global()
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", single_threaded, 1, device_index)


def _torch_libraries_global() -> None:
    """Put the loaded ``torch/lib`` libraries in the global symbol scope, where a C++ program has them.

    Python loads libtorch privately (``RTLD_LOCAL``), so a package's ``wrapper.so`` runs its own copies of
    the C++ standard library templates it instantiates (``std::regex``, parsing its device string) instead
    of libtorch's (which exports them). On the GPU machines (torch 2.11) that crashed every fresh process
    with SIGSEGV in ``std::regex_traits::transform_primary``; with libtorch global, as in the C++ runner,
    the same packages load and run (PERFORMANCE.md, fifth session; ``benchmarks/probe_pt2.py``).
    """
    if not sys.platform.startswith("linux"):
        return
    lib = Path(torch.__file__).parent / "lib"
    with open("/proc/self/maps") as maps:
        loaded = {line.split()[-1] for line in maps if str(lib) in line}
    for path in sorted(loaded):
        if path.endswith(".so") or ".so." in path:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)


def _pt2_preflight(path: Path) -> dict[str, Any]:
    """The sidecar metadata of a .pt2 after checking it is a complete package of this torch version."""
    if not zipfile.is_zipfile(path):
        raise EngineError(
            f"{path.name} is not a .pt2 package (truncated, or another format): re-export it with "
            f"retinaflow export model.pth {path.name}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise EngineError(f"{path.name} is damaged ({first_line(exc)}): re-export it") from exc
    if bad is not None:
        raise EngineError(f"{path.name} is damaged ({bad} fails its checksum): re-export it")
    meta = read_sidecar(path) if sidecar(path).is_file() else {}
    _check_torch_version(meta, path)
    return meta


def _check_torch_version(meta: dict[str, Any], path: Path) -> None:
    built, here = meta.get("torch_version"), torch.__version__.split("+")[0]
    if built and built != here:
        raise EngineError(
            f"{path.name} was built with torch {built}, this is torch {here}: AOTInductor packages only "
            f"load in the torch that built them; re-export it here"
        )


def _check_gpu(meta: dict[str, Any], path: Path, device: torch.device) -> None:
    """EngineError when a CUDA package was compiled for another GPU architecture than ``device``'s."""
    built = meta.get("compute_capability")
    if device.type != "cuda" or not built:
        return
    here = gpu_identity(device)
    if str(built) != here["compute_capability"]:
        raise EngineError(
            f"{path.name} was compiled for compute capability {built} ({meta.get('gpu', 'another GPU')}), "
            f"this GPU ({here['gpu']}) is {here['compute_capability']}: re-export it on this GPU"
        )


def _register_ops(device: torch.device, path: Path) -> None:
    """Register ``torch.ops.retinaflow.*`` (and their CUDA impls for a CUDA engine) before loading."""
    import retinaflow.ops._library  # noqa: F401

    if device.type == "cuda":
        from retinaflow.ops import _ext

        try:
            _ext.load()
        except MissingDependency as exc:
            message = f"{path.name} calls retinaflow's CUDA kernels, which cannot load: {exc}"
            raise MissingDependency(message) from exc
