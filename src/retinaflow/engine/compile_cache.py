"""``torch.compile``'s artifacts in one file (PyTorch's "Mega-Cache"): a fresh process skips the compile.

A training pod starts on a fresh file system: without its inductor cache, ``--compile`` spends minutes
compiling the R50 training step again (196 s on an H100, docs/PERFORMANCE.md). ``train.compile_cache``
names a file (on a persistent volume, or next to the checkpoint) that holds the inductor, Triton,
AOTAutograd, autotuning and dynamic-shape (PGO) caches: :func:`load` fills the in-process caches from it
before the first step, :func:`save` writes it again once this process compiled something new. The
artifacts are valid for the same torch and Triton versions and the same GPU; PyTorch checks that and
compiles again where they do not match.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch._dynamo.utils import counters

log = logging.getLogger(__name__)


def compiled_graphs() -> int:
    """How many graphs this process compiled itself so far (inductor and AOTAutograd cache misses)."""
    return int(counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"])


# Compile phases PyTorch times (``torch._dynamo.utils.compilation_time_metrics``), by what they cost a user:
# tracing the Python code, tracing forward + backward, generating and compiling kernels, loading the
# compiled modules (kernels compiled or loaded included: on a warm start the whole compile that is left).
PHASES = {
    "bytecode_tracing": "dynamo tracing",
    "aot_trace_joint_graph": "AOTAutograd tracing",
    "fx_codegen_and_compile": "inductor codegen",
    "PyCodeCache.load_by_key_path": "loading compiled code",
}


def outcome() -> str:
    """What the compile caches did in this process so far, and the time of each phase, for the log after
    the first step: a graph AOTAutograd's cache bypasses is traced again by every process, even one
    started from the file."""
    aot, fx = counters["aot_autograd"], counters["inductor"]
    caches = (
        f"AOTAutograd cache {aot['autograd_cache_hit']} hit / {aot['autograd_cache_miss']} miss / "
        f"{aot['autograd_cache_bypass']} bypass, inductor cache {fx['fxgraph_cache_hit']} hit / "
        f"{fx['fxgraph_cache_miss']} miss / {fx['fxgraph_cache_bypass']} bypass"
    )
    phases = phase_seconds()
    if not phases:
        return caches
    return caches + "; " + ", ".join(f"{PHASES[k]} {v:.1f} s" for k, v in phases.items())


def phase_seconds(names: Iterable[str] | None = tuple(PHASES)) -> dict[str, float]:
    """Seconds this process spent so far in each phase of ``names`` it went through (None: every phase
    PyTorch timed, nested ones included)."""
    from torch._dynamo.utils import compilation_time_metrics

    metrics = compilation_time_metrics
    return {k: sum(metrics[k]) for k in (metrics if names is None else names) if metrics.get(k)}


def load(path: str | Path) -> int:
    """Fill the in-process compile caches from ``path``; returns how many artifacts it held (0: no file, or
    one that cannot be read: then a warning, and the run compiles as without it)."""
    path = Path(path)
    if not path.is_file():
        log.info("compile cache: %s does not exist yet; it is written after the first compile", path)
        return 0
    torch_log = logging.getLogger("torch.compiler._cache")  # logs a traceback for a file it cannot read
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception:  # a torn or foreign file costs a compile, never the run
        info = None
    finally:
        torch_log.setLevel(level)
    if info is None:
        log.warning("compile cache: cannot read %s; compiling without it", path)
        return 0
    count = sum(len(v) for v in info.artifacts.values()) if info is not None else 0
    log.info("compile cache: %d artifacts loaded from %s", count, path)
    return count


def save(path: str | Path) -> bool:
    """Write this process's compile artifacts to ``path`` (atomically); False when there is nothing."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    data, info = saved
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    count = sum(len(v) for v in info.artifacts.values())
    log.info("compile cache: %d artifacts (%.1f MB) written to %s", count, len(data) / 2**20, path)
    return True
