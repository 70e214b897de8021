"""``torch.compile``'s artifacts in one file (PyTorch's "Mega-Cache"): a fresh process skips the compile.

A training pod starts on a fresh file system: without its inductor cache, ``--compile`` spends minutes
compiling the R50 training step again (196 s on an H100, docs/PERFORMANCE.md). ``train.compile_cache``
names a file (on a persistent volume, or next to the checkpoint) that holds the inductor, Triton,
AOTAutograd, autotuning and dynamic-shape (PGO) caches: :func:`load` fills the in-process caches from it
before the first step, :func:`save` writes it again once a rank compiled something new. The artifacts
are valid for the same torch and Triton versions and the same GPU; PyTorch checks that and compiles again
where they do not match.

Inductor's cache keys hold the GPU's index (the inputs' device), and its Triton kernels are kept per index
(``<cache dir>/triton/<index>``): what ``cuda:0`` compiled is no use to ``cuda:1``. So the file holds one
set of artifacts per device of a node (``cuda:0``, ``cuda:1``, ...), each rank loads its own device's, and
every rank of the first node contributes its own when the file is rewritten. With
``train.compile_package`` the file also holds each device's package of the compiled forward
(``engine.compile_package``, key ``"cuda:0 package"``). Layout: a magic line, a JSON line
``{"cuda:0": bytes, ...}``, then the sets in that order. A file of one set without that header (retinaflow
before 2026-11-28) is loaded by every device.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from retinaflow.engine import distributed as D

log = logging.getLogger(__name__)

MAGIC = b"retinaflow compile cache 1\n"
ANY_DEVICE = ""  # the key of a file's one set of artifacts when it has no header (older files)


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


def device_key(device: torch.device) -> str:
    """The key of ``device``'s artifacts in the file: ``cuda:1``, ``cpu``."""
    return f"{device.type}:{device.index}" if device.index is not None else device.type


def package_key(device: torch.device) -> str:
    """The key of ``device``'s compiled-forward package in the file: ``cuda:1 package``."""
    return f"{device_key(device)} package"


def read(path: str | Path) -> dict[str, bytes]:
    """The sets of artifacts in the file at ``path``, by device key. Raises OSError if it cannot be read,
    ValueError if it is not a whole file of this layout (a torn write, another file)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        return {ANY_DEVICE: data}
    end = data.find(b"\n", len(MAGIC))
    sizes = json.loads(data[len(MAGIC) : end]) if end > 0 else None
    if not isinstance(sizes, dict) or not all(isinstance(n, int) and n >= 0 for n in sizes.values()):
        raise ValueError(f"{path}: not a compile cache file")
    sets, offset = {}, end + 1
    for key, size in sizes.items():
        sets[key], offset = data[offset : offset + size], offset + size
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset:+d} bytes against its header (a torn write?)")
    return sets


def write(path: str | Path, sets: dict[str, bytes]) -> None:
    """Write ``sets`` (device key → artifacts) to ``path`` atomically: a reader sees the old file or the
    new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({key: len(blob) for key, blob in sets.items()}).encode() + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        out.write(MAGIC + header)
        for blob in sets.values():
            out.write(blob)
    os.replace(tmp, path)


def load(path: str | Path, device: torch.device) -> int:
    """Fill the in-process compile caches from ``device``'s artifacts in ``path``; returns how many there
    were (0: no file, none for this device, or a file that cannot be read: then a warning, and the run
    compiles as without it)."""
    path = Path(path)
    if not path.is_file():
        log.info("compile cache: %s does not exist yet; it is written after the first compile", path)
        return 0
    key = device_key(device)
    try:
        sets = read(path)
    except (OSError, ValueError):
        log.warning("compile cache: cannot read %s; compiling without it", path)
        return 0
    blob = sets.get(key, sets.get(ANY_DEVICE))
    if blob is None:
        held = ", ".join(k for k in sets if not k.endswith(" package"))
        held = f"only {held}" if held else "none for any device"
        log.info("compile cache: %s has no artifacts for %s (%s); compiling them", path, key, held)
        return 0
    torch_log = logging.getLogger("torch.compiler._cache")  # logs a traceback for a file it cannot read
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        info = torch.compiler.load_cache_artifacts(blob)
    except Exception:  # a torn or foreign file costs a compile, never the run
        info = None
    finally:
        torch_log.setLevel(level)
    if info is None:
        log.warning("compile cache: cannot read %s; compiling without it", path)
        return 0
    count = sum(len(v) for v in info.artifacts.values())
    log.info("compile cache: %d artifacts for %s loaded from %s", count, key, path)
    return count


def load_package(path: str | Path, device: torch.device) -> bytes | None:
    """``device``'s package of the compiled forward in ``path`` (``train.compile_package``), None if the file
    holds none or cannot be read."""
    try:
        return read(path).get(package_key(device))
    except (OSError, ValueError):
        return None


def save(path: str | Path, info: D.DistInfo, package: bytes | None = None) -> bool:
    """Collective (every rank calls it): rewrite ``path`` with each device's artifacts (and ``package``, its
    compiled forward, where given), those of the first node's ranks, one per device, merged into what the
    file held (the sets of devices this run has not got are kept). Rank 0 writes; returns whether it did."""
    first_node = info.rank == info.local_rank
    saved = torch.compiler.save_cache_artifacts() if first_node else None
    mine = (info.device, saved[0] if saved is not None else None, package if first_node else None)
    gathered = D.gather_to_main(mine, info)
    if gathered is None:
        return False
    new = {device_key(device): blob for device, blob, _ in gathered if blob}
    new |= {package_key(device): pkg for device, _, pkg in gathered if pkg}
    if not new:
        return False
    try:
        sets = read(path)
    except (OSError, ValueError):  # no file yet, or an unreadable one: replaced
        sets = {}
    sets.pop(ANY_DEVICE, None)  # an older file's one set: for which device is not known
    sets.update(new)
    write(path, sets)
    mb = sum(len(b) for b in new.values()) / 2**20
    log.info("compile cache: artifacts of %s (%.1f MB) written to %s", ", ".join(new), mb, path)
    return True
