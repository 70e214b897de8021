"""Which export settings make the ``.pt2`` engine fastest: a search for PERFORMANCE.md, not a benchmark.

Each variant changes one thing of ``bench_engine.py``'s engine (R50-FPN, fp16, 800x1344): the batch range,
the input's memory format, or inductor's compile options. All variants are exported at once (each by
``retinaflow export`` in its own process, inductor options patched in), then each engine is loaded in a
fresh process and timed as ``bench_engine.py`` times it (batch 1 latency with and without CUDA graphs,
batch 32 throughput), with cuDNN autotuning on (the engine's input size is fixed). ``--profile`` adds the
GPU time per kernel class (convolutions, Triton, retinaflow ops, other) of one batch-32 call.

    python benchmarks/tune_engine.py [--variants base,base#2,static32,...] [--repeat N] [--out DIR]

``NAME#K`` exports variant NAME once more (its own engine); ``--repeat N`` measures each engine in N fresh
processes (what varies between exports, and what between processes loading one engine).

The peer (``--peer``, on by default): the in-process fast path the issue's batch-1 target was set from,
``retinaflow infer --compile --cuda-graph`` (``make_detector`` with ``infer.compile=inductor`` and
``infer.cuda_graph``, fp16 weights), on the same calibrated checkpoint as ``base``, timed at batch 1 in
its own fresh process after it compiles; each variant's line then carries ``b1_graph_vs_peer`` (engine
ms / peer ms: below 1 is faster).

Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from probe_pt2 import checkpoint

HEIGHT, WIDTH = 800, 1344

# name: (model overrides, batch range, export-process patches: inductor options and "channels_last_input")
VARIANTS: dict[str, tuple[dict[str, Any], tuple[int, int], dict[str, Any]]] = {
    "base": ({}, (1, 32), {}),  # bench_engine's engine: the default export (epilogues in cuDNN)
    "unfused": ({}, (1, 32), {"args": ["--no-fuse-epilogues"]}),  # the default until the eighth session
    "example_batch2": ({}, (1, 32), {"example_batch": 2}),  # what export used until the sixth session
    # subnets apart: the default until the ninth session, and again for heads without GroupNorm
    "split_head": ({}, (1, 32), {"split_head": True}),
    "stem3": ({}, (1, 32), {"stem3": True}),  # the export until the eighteenth session (3-channel stem)
    "static32": ({}, (32, 32), {}),
    "static1": ({}, (1, 1), {}),
    "channels_last_input": ({}, (1, 32), {"channels_last_input": True}),
    "freezing": ({}, (1, 32), {"freezing": True}),
    "coordinate_descent": ({}, (1, 32), {"coordinate_descent_tuning": True}),
    "max_autotune": ({}, (1, 32), {"max_autotune": True, "max_autotune_conv_backends": "ATEN,TRITON"}),
    # inductor's combo kernels: data-independent kernels launched as one (the head's GroupNorm kernels of
    # the five levels are independent; at batch 1 each is a short, latency-bound launch)
    "combo_kernels": ({}, (1, 32), {"combo_kernels": True}),
    "combo_kernels_benchmarked": ({}, (1, 32), {"combo_kernels": True, "benchmark_combo_kernel": True}),
    "no_gn_head": ({"head_norm": "none"}, (1, 32), {}),  # the ODTK head
    # the GroupNorm head (the default until the seventeenth session; the default now: a BatchNorm per
    # level, folded into per-level copies of the head's convolutions)
    "gn_head": ({"head_norm": "gn"}, (1, 32), {}),
    "no_gn_head_unfused": ({"head_norm": "none"}, (1, 32), {"args": ["--no-fuse-epilogues"]}),
    "no_gn_head_split": ({"head_norm": "none"}, (1, 32), {"split_head": True}),
}

EXPORT = """
import json, sys, torch
extra = json.loads(sys.argv[1])
if extra.pop("channels_last_input", False):
    from retinaflow.model.retinanet import RetinaNet
    normalize = RetinaNet.normalize
    RetinaNet.normalize = lambda self, x: normalize(self, x.contiguous(memory_format=torch.channels_last))
extra.pop("args", None)  # CLI flags, passed by the driver
if extra.pop("split_head", False):  # (classes, not lambdas: export_pt2 checks isinstance(head, MergedHead))
    from retinaflow.export import aoti
    class Split(aoti.MergedHead):
        def __new__(cls, head): return head
    aoti.MergedHead = Split
if extra.pop("stem3", False):  # the stem reads the image's 3 channels (cuDNN pads them to 4 itself)
    from retinaflow.export import aoti
    aoti.STEM_CHANNELS = 3
example_batch = extra.pop("example_batch", None)
if example_batch:
    from retinaflow.export import aoti
    export_program = aoti.export_program
    def with_example(module, spec, device):  # the batch the example input has (the kernels' size hint)
        return export_program(module, spec, device, example_batch)
    aoti.export_program = with_example
compile_and_package = torch._inductor.aoti_compile_and_package
def patched(program, package_path=None, inductor_configs=None):
    configs = {**inductor_configs, **extra}
    return compile_and_package(program, package_path=package_path, inductor_configs=configs)
torch._inductor.aoti_compile_and_package = patched
from retinaflow.cli import main
sys.exit(main(sys.argv[2:]))
"""

MEASURE = """
import json, os, sys, torch
from bench_engine import measure_batches
from retinaflow.export.engines import open_engine
path, lo, hi, iters, profile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
# CUDNN_BENCHMARK=0: cuDNN's heuristics pick each convolution's algorithm (the same in every process) instead
# of the autotuner, which times each once per process: batch-1 readings of one engine fall in two groups
# ~0.1 ms apart across processes (docs/PERFORMANCE.md, eighteenth session)
torch.backends.cudnn.benchmark = os.environ.get("CUDNN_BENCHMARK", "1") == "1"
# the autotuner tries the heuristics' first N algorithms per shape (torch's default 10; 0: all of them)
torch.backends.cudnn.benchmark_limit = int(os.environ.get("CUDNN_BENCHMARK_LIMIT", "10"))
batches = [b for b in (1, 32) if lo <= b <= hi]
out = {"pt2": measure_batches(open_engine(path, "cuda"), batches, iters)}
if 1 in batches:
    out["pt2_cuda_graph"] = measure_batches(open_engine(path, "cuda", cuda_graph=True), [1], iters)
if profile == "1":
    from bench_engine import kernel_classes
    engine = open_engine(path, "cuda")
    out.update({f"profile_b{b}": kernel_classes(engine, b) for b in batches})
print("RESULT " + json.dumps(out))
"""

PEER = """
import json, sys, torch
from bench_engine import measure_batches
from retinaflow.engine.infer import load_model, make_detector
torch.backends.cudnn.benchmark = True
model, config, _ = load_model(sys.argv[1], torch.device("cuda"))
config.infer.compile, config.infer.cuda_graph = "inductor", True
detector = make_detector(model, config, torch.float16, inference_only=True)
print("RESULT " + json.dumps({"compiled_cuda_graph": measure_batches(detector, [1], int(sys.argv[2]))}))
"""


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = -999, f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
    log.write_text(text if isinstance(text, str) else str(text))
    return rc, round(time.perf_counter() - t0, 1), text


def _variant(name: str) -> tuple[dict[str, Any], tuple[int, int], dict[str, Any]]:
    """``VARIANTS`` entry of ``name``, or of ``base`` for ``base#2`` (another export of the same variant)."""
    return VARIANTS[name.partition("#")[0]]


def export(name: str, out: Path, timeout: float, candidates: int) -> dict[str, Any]:
    overrides, (lo, hi), patches = _variant(name)
    folder = out / name.replace("#", "_")
    folder.mkdir(parents=True, exist_ok=True)
    engine = folder / "engine.pt2"
    model = checkpoint(folder, overrides, candidates)
    cmd = [sys.executable, "-c", EXPORT, json.dumps(patches), "export", str(model)]
    cmd += [str(engine), "--device", "cuda", "--precision", "fp16", "--batch", str(lo), str(hi)]
    cmd += ["--size", str(HEIGHT), str(WIDTH), *patches.get("args", [])]
    rc, secs, text = _run(cmd, folder / "export.log", timeout)
    result: dict[str, Any] = {"variant": name, "export_rc": rc, "export_s": secs}
    if rc != 0:
        result["export_tail"] = [line[-240:] for line in text.strip().splitlines()[-5:]]
    return result


def measure(name: str, out: Path, iters: int, profile: bool, run: int = 0) -> dict[str, Any]:
    _, (lo, hi), _ = _variant(name)
    folder = out / name.replace("#", "_")
    cmd = [sys.executable, "-c", MEASURE, str(folder / "engine.pt2"), str(lo), str(hi), str(iters)]
    cmd.append("1" if profile else "0")
    rc, secs, text = _run(cmd, folder / f"measure{run}.log", 240)
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if rc != 0 or not lines:
        return {"measure_rc": rc, "measure_tail": [line[-240:] for line in text.strip().splitlines()[-5:]]}
    return {"measure_s": secs, **json.loads(lines[-1][len("RESULT ") :])}


def _peer(out: Path, iters: int, candidates: int) -> dict[str, Any]:
    """The in-process ``--compile --cuda-graph`` detector on ``base``'s checkpoint, in a fresh process."""
    folder = out / "peer"
    folder.mkdir(parents=True, exist_ok=True)
    model = checkpoint(folder, _variant("base")[0], candidates)
    rc, secs, text = _run([sys.executable, "-c", PEER, str(model), str(iters)], folder / "peer.log", 400)
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if rc != 0 or not lines:
        return {"peer_rc": rc, "peer_tail": [line[-240:] for line in text.strip().splitlines()[-5:]]}
    return {"peer_s": secs, **json.loads(lines[-1][len("RESULT ") :])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/tune_engine")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", default="base", help="variants to profile (batches 1, 32)")
    ap.add_argument("--export-timeout", type=float, default=400)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes measuring each engine")
    ap.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time `infer --compile --cuda-graph` at batch 1 (the issue's reference path)",
    )
    ap.add_argument(
        "--candidates",
        type=int,
        default=5000,
        help="score threshold leaving this many pairs of the batch-1 image (0: the default threshold)",
    )
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n.partition("#")[0] not in VARIANTS]
    if unknown:
        sys.exit(f"tune_engine: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(len(names)) as pool:  # the compiles are mostly single-threaded: all at once
        exported = list(pool.map(lambda n: export(n, out, args.export_timeout, args.candidates), names))
    peer_ms = None
    if args.peer:
        peer = _peer(out, args.iters, args.candidates)
        print(json.dumps({"variant": "peer_infer_compile_cuda_graph", **peer}), flush=True)
        peer_ms = peer.get("compiled_cuda_graph", {}).get("latency_b1_ms")
    profiled = args.profile.split(",")
    for result in exported:
        name = result["variant"]
        for run in range(args.repeat if result["export_rc"] == 0 else 0):
            timed = measure(name, out, args.iters, name.partition("#")[0] in profiled, run)
            result.update(timed if run == 0 else {f"run{run}": timed})
        graph_ms = result.get("pt2_cuda_graph", {}).get("latency_b1_ms")
        if peer_ms and graph_ms:
            result["b1_graph_vs_peer"] = round(graph_ms / peer_ms, 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
