"""Why CUDA ``.pt2`` packages crashed when loaded: a bisection for PERFORMANCE.md, not a benchmark.

CUDA packages died with SIGSEGV inside ``aoti_load_package`` when loaded from Python in a fresh process,
while they loaded in the process that exported them and in the C++ runner. Found with the load modes
below (fifth session): the crash is in the package's own ``std::regex`` code; loaded with libtorch's
libraries made global first (``direct_rtld_global``, ``direct_promote``; what ``open_engine`` now does,
mode ``engine``) the packages load and run. Each variant below changes one
thing of the package; each is exported by ``retinaflow export`` and then loaded and run once (batch 1) in
fresh processes, one per ``--load-modes`` entry (see ``LOAD_MODES``), so a crash ends that load only.
Exports run ``--parallel`` at a time.

    python benchmarks/probe_pt2.py --out DIR [--variants r50,tiny,...] [--load-modes engine,direct,...]

Prints one JSON line per variant: export and load exit codes (negative = killed by that signal), the
load's timed phases and last lines; for a native crash, the crashing C++ frames (``native/segv_backtrace.c``
preloaded into every load process).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import Config
from retinaflow.engine.checkpoint import save_checkpoint
from retinaflow.model.retinanet import build_model

TINY = {"backbone": "resnet18", "fpn_channels": 32, "head_convs": 1, "num_classes": 3}  # the GPU test's

# name: (model overrides, precision, batch range, size[, inductor config overrides])
VARIANTS: dict[str, tuple[Any, ...]] = {
    "r50": ({}, "fp16", (1, 32), (800, 1344)),  # bench_engine's engine
    "r50_b1": ({}, "fp16", (1, 1), (800, 1344)),
    "r50_fp32_b1": ({}, "fp32", (1, 1), (800, 1344)),
    "r50_no_gn_head": ({"head_norm": "none"}, "fp16", (1, 32), (800, 1344)),
    "r50_128px": ({}, "fp16", (1, 8), (128, 128)),
    "r18": ({"backbone": "resnet18"}, "fp16", (1, 32), (800, 1344)),
    "tiny": (TINY, "fp16", (1, 8), (128, 128)),  # loads in tests/export/test_aoti.py
    "tiny_80_classes": ({**TINY, "num_classes": 80}, "fp16", (1, 8), (128, 128)),
    "tiny_wide_head": ({**TINY, "fpn_channels": 256, "head_convs": 4}, "fp16", (1, 8), (128, 128)),
    "r50_no_metadata": ({}, "fp16", (1, 1), (800, 1344), {"aot_inductor.metadata": {}}),
}

# ``retinaflow export`` with some inductor configs replaced (``aot_inductor.metadata``: the engine's
# metadata compiled into the package)
EXPORT = """
import json, sys, torch
extra = json.loads(sys.argv[1])
compile_and_package = torch._inductor.aoti_compile_and_package
def patched(program, package_path=None, inductor_configs=None):
    configs = {**(inductor_configs or {}), **extra}
    return compile_and_package(program, package_path=package_path, inductor_configs=configs)
torch._inductor.aoti_compile_and_package = patched
from retinaflow.cli import main
sys.exit(main(sys.argv[2:]))
"""

LOAD = """
import os, sys, time
path, h, w, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "direct_rtld_global":  # every library global, as in a C++ program
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
import torch
t0 = time.perf_counter()
def mark(what):
    print(f"[{time.perf_counter() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)
torch.zeros(1, device="cuda")
mark("cuda context")
if mode == "engine":  # what retinaflow infer does
    from retinaflow.export.engines import open_engine
    engine = open_engine(path, "cuda")
    mark("open_engine")
    run = lambda i, s: engine(i, s).counts
else:
    if mode != "no_ops":
        import retinaflow.ops._library
        from retinaflow.ops import _ext
        mark("kernels loaded: " + _ext.load())
    if mode == "direct_promote":  # torch/lib's libraries made global after the fact
        from retinaflow.export.engines import _torch_libraries_global
        _torch_libraries_global()
    if mode == "direct_triton":
        import triton
    maps = open("/proc/self/maps").read().splitlines()
    mark("libstdc++ mapped: " + ", ".join(sorted({l.split()[-1] for l in maps if "libstdc++" in l})))
    index = 0 if mode == "direct_idx0" else -1
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)
    mark("AOTIModelPackageLoader")
    run = lambda i, s: loader.run([i, s])[0]
images = torch.zeros(1, 3, h, w, dtype=torch.uint8, device="cuda")
sizes = torch.tensor([[h, w]], device="cuda")
counts = run(images, sizes)
torch.cuda.synchronize()
mark("ran: detections " + str(int(counts.sum())))
"""
# How a load process gets the package (``--load-modes``): engine = retinaflow's open_engine; direct = the
# C++ loader after registering the ops (as the C++ runner does; device -1); direct_idx0 = the same on
# device 0; direct_rtld_global = direct with every library loaded RTLD_GLOBAL; direct_promote = direct
# after making torch/lib's libraries global; direct_triton = direct after importing triton;
# direct_c_locale = direct under LC_ALL=C; no_ops = the C++ loader without retinaflow's ops.
LOAD_MODES = (
    "engine",
    "direct",
    "direct_idx0",
    "direct_rtld_global",
    "direct_promote",
    "direct_triton",
    "direct_c_locale",
    "no_ops",
)


def checkpoint(folder: Path, overrides: dict[str, Any], candidates: int = 0) -> Path:
    """A random-init R50 checkpoint with ``overrides`` of the model config. ``candidates`` > 0: its score
    threshold leaves that many (anchor, class) pairs of ``bench_engine``'s batch-1 image above it (a
    random head scores every pair near the prior, so the default threshold leaves a few, or millions,
    depending on an export's rounding; a trained model on a busy image leaves thousands)."""
    cfg = Config()
    for key, value in overrides.items():
        setattr(cfg.model, key, value)
    cfg.class_names = [f"c{i}" for i in range(cfg.model.num_classes)]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if candidates:
        cfg.infer.score_thresh = _threshold(model, candidates)
    payload: dict[str, Any] = {"arch": model.arch, "model": model.state_dict(), "config": cfg.to_dict()}
    payload.update(class_names=cfg.class_names, category_ids=list(range(1, 81)), iteration=0)
    return save_checkpoint(folder / "model.pth", payload)


def _threshold(model: torch.nn.Module, candidates: int) -> float:
    from bench_e2e_latency import threshold_for
    from bench_engine import inputs

    net = copy.deepcopy(model).cuda().eval().to(memory_format=torch.channels_last)
    images, _ = inputs(1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        cls, _ = net(images)
    return threshold_for(cls, candidates)


def _run(cmd: list[str], log: Path) -> tuple[int, float, list[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    tail = [line[-240:] for line in (proc.stdout + proc.stderr).strip().splitlines()[-6:]]
    return proc.returncode, round(time.perf_counter() - t0, 1), tail


def probe(name: str, out: Path, modes: list[str], preload: Path | None) -> dict[str, Any]:
    overrides, precision, (lo, hi), (h, w), *inductor = VARIANTS[name]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(folder, overrides)
    engine = folder / f"{name}.pt2"
    export = [sys.executable, "-c", EXPORT, json.dumps(inductor[0] if inductor else {})]
    export += [
        "export",
        str(ckpt),
        str(engine),
        "--device",
        "cuda",
        "--precision",
        precision,
        "--batch",
        str(lo),
        str(hi),
        "--size",
        str(h),
        str(w),
    ]
    result: dict[str, Any] = {"variant": name}
    rc, secs, tail = _run(export, folder / "export.log")
    result.update(export_rc=rc, export_s=secs)
    if rc != 0:
        result["export_tail"] = tail
        return result
    result["package_mb"] = round(engine.stat().st_size / 2**20, 1)

    def load(mode: str) -> dict[str, Any]:
        cmd = [sys.executable, "-X", "faulthandler", "-c", LOAD, str(engine), str(h), str(w), mode]
        env = {**os.environ, **({"LD_PRELOAD": str(preload)} if preload else {})}
        if mode == "direct_c_locale":
            env.update(LC_ALL="C", LANG="C")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        text = proc.stdout + proc.stderr
        (folder / f"load_{mode}.log").write_text(text)
        python, _, native = text.partition("== native backtrace")
        tail = [
            line[-240:] for line in python.strip().splitlines() if not line.startswith("Extension modules")
        ]
        entry = {"load_rc": proc.returncode, "load_s": round(time.perf_counter() - t0, 1), "tail": tail[-14:]}
        if native:
            entry["native_backtrace"] = _demangle(native).strip().splitlines()[1:41]
        return entry

    with ThreadPoolExecutor(len(modes)) as pool:  # each load in its own process, all at once
        result.update(zip(modes, pool.map(load, modes), strict=True))
    return result


def segv_preload(folder: Path) -> Path | None:
    """``native/segv_backtrace.c`` built with the first C compiler found (or ``$SEGV_BACKTRACE_SO``):
    preloaded into the load processes, it prints the native frames of a crash (no gdb on the GPU
    machines)."""
    given = os.environ.get("SEGV_BACKTRACE_SO")
    if given:
        return Path(given)
    compiler = next((c for c in ("gcc", "cc", "c++", "g++") if shutil.which(c)), None)
    if compiler is None:
        return None
    lib = folder / "segv_backtrace.so"
    source = Path(__file__).resolve().parent / "native" / "segv_backtrace.c"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(lib), str(source)], check=True)
    return lib


def _demangle(text: str) -> str:
    if not shutil.which("c++filt"):
        return text
    return subprocess.run(["c++filt"], input=text, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/probe_pt2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--load-modes", default="engine", help=f"comma-separated, of {', '.join(LOAD_MODES)}")
    args = ap.parse_args()
    out = Path(args.out)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"probe_pt2: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    preload = segv_preload(out)
    modes = args.load_modes.split(",")
    if set(modes) - set(LOAD_MODES):
        sys.exit(f"probe_pt2: unknown load modes {sorted(set(modes) - set(LOAD_MODES))}")
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda n: probe(n, out, modes, preload), names):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
