"""Which CUDA ``.pt2`` packages crash when loaded: a bisection for PERFORMANCE.md, not a benchmark.

The R50-FPN engine of ``bench_engine.py`` dies with SIGSEGV inside ``aoti_load_package`` while the tiny
test engines (ResNet-18, 128 px, one head conv) load. Each variant below changes one thing from the
failing case; each is exported by ``retinaflow export`` and then loaded and run once (batch 1) in its own
process, so a crash ends that variant only. Exports run ``--parallel`` at a time.

    python benchmarks/probe_pt2.py --out DIR [--variants r50,r50_b1,...] [--parallel 3]

Prints one JSON line per variant: export and load exit codes (negative = killed by that signal) and the
last lines of the failing process's output; for a native crash, the crashing C++ frames (the load rerun
with ``native/segv_backtrace.c`` preloaded, built with gcc on the spot).
"""

from __future__ import annotations

import argparse
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
import sys, torch
from retinaflow.export.engines import open_engine
engine = open_engine(sys.argv[1], "cuda")
h, w = int(sys.argv[2]), int(sys.argv[3])
images = torch.zeros(1, 3, h, w, dtype=torch.uint8, device="cuda")
sizes = torch.tensor([[h, w]], device="cuda")
out = engine(images, sizes)
torch.cuda.synchronize()
print("ran: detections", int(out.counts.sum()))
"""


def checkpoint(folder: Path, overrides: dict[str, Any]) -> Path:
    cfg = Config()
    for key, value in overrides.items():
        setattr(cfg.model, key, value)
    cfg.class_names = [f"c{i}" for i in range(cfg.model.num_classes)]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    payload: dict[str, Any] = {"arch": model.arch, "model": model.state_dict(), "config": cfg.to_dict()}
    payload.update(class_names=cfg.class_names, category_ids=list(range(1, 81)), iteration=0)
    return save_checkpoint(folder / "model.pth", payload)


def _run(cmd: list[str], log: Path) -> tuple[int, float, list[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    tail = [line[-240:] for line in (proc.stdout + proc.stderr).strip().splitlines()[-6:]]
    return proc.returncode, round(time.perf_counter() - t0, 1), tail


def probe(name: str, out: Path) -> dict[str, Any]:
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
    rc, secs, tail = _run(
        [sys.executable, "-X", "faulthandler", "-c", LOAD, str(engine), str(h), str(w)], folder / "load.log"
    )
    result.update(load_rc=rc, load_s=secs, load_tail=tail)
    if rc < 0 and shutil.which("gcc"):  # a native crash: where, in C++ (no gdb on the GPU machines)
        result["native_backtrace"] = native_backtrace(engine, h, w, folder)
    return result


def native_backtrace(engine: Path, h: int, w: int, folder: Path) -> list[str]:
    """Load ``engine`` again with ``native/segv_backtrace.c`` preloaded: the crashing native frames,
    demangled with ``c++filt`` where it exists."""
    lib = folder / "segv_backtrace.so"
    source = Path(__file__).resolve().parent / "native" / "segv_backtrace.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(source)], check=True)
    env = {**os.environ, "LD_PRELOAD": str(lib)}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(engine), str(h), str(w)], capture_output=True, text=True, env=env
    )
    text = proc.stderr.split("== native backtrace", 1)[-1]
    if shutil.which("c++filt"):
        text = subprocess.run(["c++filt"], input=text, capture_output=True, text=True).stdout
    (folder / "native_backtrace.log").write_text(text)
    return [line[-200:] for line in text.strip().splitlines()[:40]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/probe_pt2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--parallel", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"probe_pt2: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda n: probe(n, out), names):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
