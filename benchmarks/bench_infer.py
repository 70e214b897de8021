"""Inference: batch-1 latency and batch-N throughput including pre- and post-processing.

retinaflow R50-FPN through the engine's detector (uint8 image on the GPU -> pad to ``infer.pad_stride``
-> network with frozen BN folded, fp16 weights, channels_last, normalising inside -> decode + NMS
kernels), eager and with
``--cuda-graph`` (one captured graph per input shape), vs torchvision retinanet_resnet50_fpn (its
own transform and postprocess_detections, fp16 autocast), same process, same images (800x1333).
Issue 2 target: batch-1 latency ratio (retinaflow / torchvision) <= 0.6.

    python benchmarks/bench_infer.py [--batches 1 8] [--iters 50] [--compile]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from bench_e2e_latency import CANDIDATES, threshold_for
from common import emit, time_ms

from retinaflow.config import Config
from retinaflow.engine.infer import make_detector
from retinaflow.model.retinanet import build_model

NUM_CLASSES = 80


def make_retinaflow(model, cfg: Config, cuda_graph: bool, compile_backend: str = ""):
    """The engine's detector (weights cast to fp16 once; optionally per-shape CUDA graphs, compiled)."""
    cfg = copy.deepcopy(cfg)
    cfg.infer.cuda_graph = cuda_graph
    cfg.infer.compile = compile_backend
    detector = make_detector(model, cfg, torch.float16, inference_only=True)

    def run(images_hwc: list[torch.Tensor]) -> None:
        h = max(im.shape[0] for im in images_hwc)
        w = max(im.shape[1] for im in images_hwc)
        pad = cfg.infer.pad_stride  # as `retinaflow infer` pads
        ph, pw = -(-h // pad) * pad, -(-w // pad) * pad
        batch = torch.zeros(len(images_hwc), ph, pw, 3, dtype=torch.uint8, device="cuda")
        for i, im in enumerate(images_hwc):
            batch[i, : im.shape[0], : im.shape[1]] = im
        x = batch.permute(0, 3, 1, 2)  # NHWC memory = channels_last NCHW view, no copy
        sizes = torch.tensor([[im.shape[0], im.shape[1]] for im in images_hwc], device="cuda")
        dets = detector(x, sizes)
        dets.counts.cpu()  # results reach the host, as a user would need them

    return run


def make_torchvision(probe: torch.Tensor, max_det: int):
    model = (
        torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES
        )
        .cuda()
        .eval()
    )
    with torch.autocast("cuda", dtype=torch.float16):
        batched, _ = model.transform([probe.permute(2, 0, 1).float() / 255])
        logits = model.head(list(model.backbone(batched.tensors).values()))["cls_logits"]
    model.score_thresh = threshold_for([logits], CANDIDATES)
    model.detections_per_img = max_det

    def run(images_hwc: list[torch.Tensor]) -> None:
        images = [im.permute(2, 0, 1).float() / 255 for im in images_hwc]
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(images)
        out[-1]["boxes"].cpu()

    return run


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time --compile --cuda-graph (inductor)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    cfg = Config()
    cfg.model.num_classes = NUM_CLASSES
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (800, 1333, 3), dtype=torch.uint8, generator=gen).cuda()
    # Random-init heads score every pair near the prior: calibrate each detector's threshold to leave
    # ~5,000 candidates per image, as a trained model on a busy image does (see bench_e2e_latency).
    model = build_model(cfg.model).cuda().eval().to(memory_format=torch.channels_last)
    tv = make_torchvision(probe, cfg.infer.max_det)
    padded = torch.zeros(1, 896, 1408, 3, dtype=torch.uint8, device="cuda")
    padded[:, :800, :1333] = probe
    with torch.autocast("cuda", dtype=torch.float16):
        cls, _ = model(padded.permute(0, 3, 1, 2))
    cfg.infer.score_thresh = threshold_for(cls, CANDIDATES)
    ours, ours_graph = make_retinaflow(model, cfg, False), make_retinaflow(model, cfg, True)
    ours_compiled = make_retinaflow(model, cfg, True, "inductor") if args.compile else None
    out: dict[str, object] = {"size": [800, 1333], "precision": "fp16", "candidates_per_image": CANDIDATES}
    for b in args.batches:
        imgs = [probe] + [
            torch.randint(0, 256, (800, 1333, 3), dtype=torch.uint8, generator=gen).cuda()
            for _ in range(b - 1)
        ]
        t_tv = time_ms(lambda imgs=imgs: tv(imgs), args.warmup, args.iters)
        t_rf = time_ms(lambda imgs=imgs: ours(imgs), args.warmup, args.iters)
        t_graph = time_ms(lambda imgs=imgs: ours_graph(imgs), args.warmup, args.iters)
        out[f"b{b}_retinaflow_graph_ms"] = round(t_graph, 2)
        out[f"b{b}_retinaflow_graph_img_s"] = round(b * 1000 / t_graph, 1)
        out[f"b{b}_graph_latency_ratio"] = round(t_graph / t_tv, 3)
        out[f"b{b}_torchvision_ms"] = round(t_tv, 2)
        out[f"b{b}_retinaflow_ms"] = round(t_rf, 2)
        out[f"b{b}_torchvision_img_s"] = round(b * 1000 / t_tv, 1)
        out[f"b{b}_retinaflow_img_s"] = round(b * 1000 / t_rf, 1)
        out[f"b{b}_latency_ratio"] = round(t_rf / t_tv, 3)
        if ours_compiled is not None:
            t_comp = time_ms(lambda imgs=imgs: ours_compiled(imgs), args.warmup, args.iters)
            out[f"b{b}_retinaflow_compiled_graph_ms"] = round(t_comp, 2)
            out[f"b{b}_retinaflow_compiled_graph_img_s"] = round(b * 1000 / t_comp, 1)
            out[f"b{b}_compiled_graph_latency_ratio"] = round(t_comp / t_tv, 3)
    emit("inference", out)


if __name__ == "__main__":
    main()
