"""Can a warm start skip dynamo? ``torch.compile(...).aot_compile()`` of the training forward, saved, loaded
in a fresh process and run at several padded shapes. A search for issue 13, not a benchmark.

A warm ``--compile`` start still traces the network with dynamo (5–11 s on the GPU hosts with symbolic
sizes, docs/PERFORMANCE.md). ``aot_compile`` packages the traced and compiled forward (and its backward);
``torch.compiler.load_compiled_function`` loads it without dynamo. Run twice, in two processes:

    python benchmarks/probe_aot_compile.py save FILE [--device cuda] [--backend inductor]
    python benchmarks/probe_aot_compile.py load FILE [--device cuda] [--shapes 800x1344,1344x800,...]

The network is the trainer's: the default R50-FPN (per-level BatchNorm head) in training mode, channels_last,
bf16 autocast, given the batch in pad-stride blocks (``engine.blocks``, symbolic in the block counts).
``save`` compiles at the first shape and writes FILE. ``load`` times the load, then at each shape
runs forward + backward through the loaded function and through the eager network (same initial weights):
first-call and steady ms, and the largest differences of outputs, gradients and BatchNorm running means.
A shape the package's guards refuse prints the guard's reason. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import ModelConfig
from retinaflow.engine import compile_package
from retinaflow.engine.blocks import BlockInput
from retinaflow.model.retinanet import build_model

BLOCK = 32  # data.pad_stride


def network(device: str) -> BlockInput:
    """The training network, seeded: the same weights in every process."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=6)).train().to(device)
    return BlockInput(model.to(memory_format=torch.channels_last), BLOCK)


def blocks(batch: int, hw: tuple[int, int], device: str, seed: int = 0) -> torch.Tensor:
    """A (B, 3, H/32, 32, W/32, 32) view of channels_last images, unmarked (the package is dynamic)."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, *hw, device=device).contiguous(memory_format=torch.channels_last)
    return x.unflatten(2, (hw[0] // BLOCK, BLOCK)).unflatten(4, (hw[1] // BLOCK, BLOCK))


def step(call: Any, net: BlockInput, x: torch.Tensor, device: str) -> tuple[float, list[torch.Tensor]]:
    """Forward under bf16 autocast + backward of a sum of the outputs: (ms, outputs)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    net.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16):
        cls_out, box_out = call(x)
    outputs = [*cls_out, *box_out]
    sum(o.float().mean() for o in outputs).backward()
    sync()
    return (time.perf_counter() - t0) * 1e3, [o.detach().float() for o in outputs]


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def save(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer's package (``compile_package.compile_forward``), traced at the first shape, to FILE."""
    net = network(args.device)
    x = blocks(args.batch, args.shapes[0], args.device)
    torch._dynamo.mark_dynamic(x, 2)  # an error names the code that specialises a block count
    torch._dynamo.mark_dynamic(x, 4)
    t0 = time.perf_counter()
    try:
        autocast = torch.autocast(args.device, dtype=torch.bfloat16)
        fn = compile_package.compile_forward(net, x, args.backend, autocast)
        blob = compile_package.serialize(fn, compile_package.fingerprint(net, args.backend, torch.bfloat16))
    except Exception as exc:  # this torch has no aot_compile, or it cannot compile this step
        return {"error": f"{type(exc).__name__}: " + " ".join(str(exc).split())[:600]}
    seconds = time.perf_counter() - t0
    Path(args.file).write_bytes(blob)
    return {"aot_compile_s": round(seconds, 1), "mb": round(len(blob) / 2**20, 1)}


def load(args: argparse.Namespace) -> dict[str, Any]:
    fingerprint = compile_package.fingerprint(network(args.device), args.backend, torch.bfloat16)
    t0 = time.perf_counter()
    try:
        autocast = torch.autocast(args.device, dtype=torch.bfloat16)
        fn = compile_package.load(Path(args.file).read_bytes(), fingerprint, autocast)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: " + " ".join(str(exc).split())[:600]}
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2)}
    net, reference = network(args.device), network(args.device)
    shapes: dict[str, Any] = {}
    for hw in args.shapes:
        x = blocks(args.batch, hw, args.device)
        try:
            times = [step(lambda x: fn(net, x), net, x, args.device) for _ in range(3)]
        except RuntimeError as exc:  # the package's guards refuse this shape
            shapes[f"{hw[0]}x{hw[1]}"] = {"error": " ".join(str(exc).split())[:400]}
            continue
        grads = [p.grad.float() for p in net.parameters() if p.grad is not None]
        eager = [step(reference, reference, x, args.device) for _ in range(3)]
        eager_grads = [p.grad.float() for p in reference.parameters() if p.grad is not None]
        means = [m.running_mean for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        eager_means = [m.running_mean for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        shapes[f"{hw[0]}x{hw[1]}"] = {
            "loaded_ms": [round(ms, 1) for ms, _ in times],
            "eager_ms": [round(ms, 1) for ms, _ in eager],
            "outputs_max_diff": largest_difference(times[-1][1], eager[-1][1]),
            "grads": [len(grads), len(eager_grads)],
            "grads_max_diff": largest_difference(grads, eager_grads)
            if len(grads) == len(eager_grads)
            else None,
            "bn_running_mean_max_diff": largest_difference(means, eager_means),
        }
    out["shapes"] = shapes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shapes", default="800x1344,1344x800,1024x1344,640x864")
    args = ap.parse_args()
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    result = save(args) if args.mode == "save" else load(args)
    print(json.dumps({"mode": args.mode, "torch": torch.__version__, "device": args.device, **result}))


if __name__ == "__main__":
    main()
