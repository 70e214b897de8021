"""The compiled training forward as one package that a fresh process runs without dynamo
(``train.compile_package``).

``train.compile_cache`` skips AOTAutograd and inductor on a warm start, but dynamo still traces the network
at every start: 5–11 s for R50-FPN with symbolic sizes on the GPU hosts (docs/PERFORMANCE.md, twenty-second
and twenty-third sessions). ``torch.compile(...).aot_compile()`` compiles dynamo's graph with the backend
into a function of (module, input) that checks its guards and runs, and that serialises;
``torch.compiler.load_compiled_function`` gives it back in another process without tracing. A run with no
package compiles its forward this way at its first step and trains through it (one compile: building a
package after a lazy compile compiled twice, 37–88 s more on an H200, since ``aot_compile`` bypasses the
AOTAutograd cache); the package is kept, one per device, in the compile-cache file, and later starts load it.

A batch the package's guards refuse (a shape its graph was not compiled for) runs through the lazily
compiled network instead, which compiles it as without a package. PyTorch marks the API experimental;
torch < 2.12 keeps it behind ``torch._dynamo.config.enable_aot_compile``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

GUARDS_REFUSED = "GuardManager check failed"  # the loaded function's error for an input it was not built for


class PackageMismatch(RuntimeError):
    """The package was compiled from another network, backend, precision, torch or retinaflow code."""


@functools.cache
def _source_digest() -> str:
    """A digest of retinaflow's Python source: the package holds the network's code as it was traced, so a
    package from other code (an upgrade, an edit) must not run."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def fingerprint(net: nn.Module, backend: str, dtype: torch.dtype | None) -> str:
    """What a package was compiled from, beyond what its guards check: torch's version, retinaflow's source,
    the backend, the autocast dtype (None: none), and the network's parameter and buffer names, shapes and
    dtypes. A hex digest."""
    h = hashlib.sha256(f"{torch.__version__}|{_source_digest()}|{backend}|{dtype}".encode())
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        h.update(f"|{name}:{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()


def compile_forward(
    net: nn.Module, example: torch.Tensor, backend: str, autocast: AbstractContextManager[Any]
) -> Callable[..., Any]:
    """``net``'s forward compiled ahead of time with ``backend``, traced on ``example`` (its dynamic
    dimensions marked) under ``autocast`` (the training step's): ``fn(net, x)``, for :func:`serialize`.
    Raises what PyTorch raises when it cannot (no ``aot_compile`` in this torch, a graph break)."""
    if hasattr(torch._dynamo.config, "enable_aot_compile"):  # torch < 2.12
        torch._dynamo.config.enable_aot_compile = True
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    # traced without the parameters' gradients: a package traced with them does not load (torch 2.14.1:
    # "assigned grad expected to be a Tensor or None but got grad of type _Missing")
    grads = {p: p.grad for p in net.parameters()}
    try:
        for p in grads:
            p.grad = None
        with autocast:
            return compiled.forward.aot_compile(((example,), {}))  # type: ignore[attr-defined,no-any-return]
    finally:
        for p, grad in grads.items():
            p.grad = grad


def serialize(fn: Callable[..., Any], fingerprint: str) -> bytes:
    """The bytes of a function :func:`compile_forward` returned, headed by its :func:`fingerprint`, for
    :func:`load`. Raises what PyTorch raises for a backend whose output does not serialise."""
    fd, name = tempfile.mkstemp(suffix=".aot")
    os.close(fd)
    try:
        fn.save_compiled_function(name)  # type: ignore[attr-defined]
        with open(name, "rb") as f:
            return fingerprint.encode() + b"\n" + f.read()
    finally:
        os.unlink(name)


def load(blob: bytes, fingerprint: str, autocast: AbstractContextManager[Any]) -> Callable[..., Any]:
    """The function :func:`serialize` packaged: ``fn(net, x)``, loaded under ``autocast`` (the context it will
    be called in: torch 2.11 rebuilds the input's dispatch-key guard from the autocast state at load time,
    so a package loaded outside autocast refuses every call inside it). Raises :class:`PackageMismatch` for
    a package of another :func:`fingerprint`, and what PyTorch raises for bytes it cannot load (a torn
    file)."""
    header, _, data = blob.partition(b"\n")
    if header != fingerprint.encode():
        raise PackageMismatch(
            "it was compiled for another network, backend, precision, torch or retinaflow code"
        )
    with autocast:
        return torch.compiler.load_compiled_function(io.BytesIO(data))  # type: ignore[no-any-return]


class PackagedForward:
    """``forward_net`` for the training step: ``net``'s forward through the loaded package, or through
    ``fallback`` (the lazily compiled network) for a batch the package's guards refuse.

    ``hits`` and ``fallbacks`` count the calls each way."""

    def __init__(self, package: Callable[..., Any], net: nn.Module, fallback: Callable[..., Any]) -> None:
        self.package, self.net, self.fallback = package, net, fallback
        self.hits = self.fallbacks = 0

    def __call__(self, x: torch.Tensor) -> Any:
        try:
            # a new view: without the dynamic-dimension marks of the lazily compiled path, which the
            # package's guards refuse (its graph carries its own symbolic sizes)
            out = self.package(self.net, x.view(x.shape))
        except RuntimeError as exc:
            if GUARDS_REFUSED not in str(exc):
                raise
            if not self.fallbacks:
                log.info("compile package: a batch of %s is outside its guards; compiling it", tuple(x.shape))
            self.fallbacks += 1
            return self.fallback(x)
        self.hits += 1
        return out
