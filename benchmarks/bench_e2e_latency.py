"""End-to-end latency: uint8 image on the GPU -> detections, one CUDA graph, vs torchvision eager.

retinaflow: R50-FPN (random init, 80 classes) prepared as ``retinaflow infer`` prepares it (frozen BN
folded into the convolutions, fp16 weights, channels_last); the captured graph holds the GPU
pre-processing (uint8 HWC 800x1333 -> zero-padded to a multiple of ``--pads`` (32 = the inference
default, 128 = the training padding) -> NCHW channels_last view; the network normalises inside), the
network and the decode + NMS kernels. ``network_graph_ms`` is the bare network alone, for reference.
torchvision: retinanet_resnet50_fpn eager under fp16 autocast (its transform and postprocess_detections), same
process, same image. Random-init heads score every pair near the prior, so each detector's score
threshold is calibrated to leave ~5,000 candidates per image (a trained model on a busy image).
Issue targets: <= 4 ms batch-1 end to end; >= 400 img/s at batch 8/16/32 including post-processing.

    python benchmarks/bench_e2e_latency.py [--batches 1 8 16 32] [--pads 32 128]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import emit
from triton.testing import do_bench

from retinaflow.config import Config
from retinaflow.engine.infer import prepare_for_inference
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.retinanet import build_model
from retinaflow.ops import _ext, boxes
from retinaflow.ops.graph import CudaGraphRunner

H, W = 800, 1333
CANDIDATES = 5000


def threshold_for(logits: list[torch.Tensor], count: int) -> float:
    """Score threshold that leaves ~``count`` (anchor, class) pairs of the first image above it."""
    flat = torch.cat([x[0].float().reshape(-1) for x in logits])
    return float(torch.sigmoid(flat.topk(count).values[-1]))


def padded_size(pad: int) -> tuple[int, int]:
    return -(-H // pad) * pad, -(-W // pad) * pad


def make_pipeline(model, cfg: Config, batch: int, pad: int):
    ph, pw = padded_size(pad)
    anchors = generate_anchors(cfg.model.anchors, (ph, pw), torch.device("cuda"), torch.float32)
    sizes = torch.tensor([[H, W]] * batch, device="cuda")

    def pipeline(images: torch.Tensor):  # (B, H, W, 3) uint8
        canvas = torch.zeros(batch, ph, pw, 3, dtype=torch.uint8, device="cuda")
        canvas[:, :H, :W] = images
        cls, box = model(canvas.permute(0, 3, 1, 2))  # NHWC memory = channels_last NCHW, no copy
        return boxes.postprocess(cls, box, anchors, sizes, cfg.infer)

    return pipeline


def bench(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def measure(model, cfg: Config, image: torch.Tensor, batch: int, pad: int) -> dict[str, float]:
    """Graph replay time of the whole pipeline and of the bare network (at batch 1 also eager time)."""
    images = image.expand(batch, -1, -1, -1).contiguous()
    pipeline = make_pipeline(model, cfg, batch, pad)
    runner = CudaGraphRunner(pipeline, [images])
    t_graph = bench(lambda: runner(images))
    ph, pw = padded_size(pad)
    x = torch.zeros(batch, ph, pw, 3, dtype=torch.uint8, device="cuda").permute(0, 3, 1, 2)
    network = CudaGraphRunner(model, [x])
    p = f"pad{pad}_b{batch}"
    res = {
        f"{p}_graph_ms": t_graph,
        f"{p}_img_per_s": batch * 1000.0 / t_graph,
        f"{p}_network_graph_ms": bench(lambda: network(x)),
    }
    if batch == 1:
        res[f"{p}_eager_ms"] = bench(lambda: pipeline(images))
        res[f"{p}_detections"] = float(runner(images).counts[0])
    return res


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--pads", type=int, nargs="+", default=[32, 128])
    ap.add_argument(
        "--compile",
        choices=["none", "default", "freezing"],
        default="none",
        help="torch.compile the network (inductor; 'freezing' also folds weights as constants)",
    )
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    _ext.load()  # the kernels, or an error: never time the reference by accident
    cfg = Config()
    cfg.model.num_classes = 80
    model = build_model(cfg.model).cuda().eval().to(memory_format=torch.channels_last)
    prepare_for_inference(model, torch.float16)  # as `retinaflow infer` does
    g = torch.Generator(device="cuda").manual_seed(0)
    image = torch.randint(0, 256, (1, H, W, 3), dtype=torch.uint8, device="cuda", generator=g)

    ph, pw = padded_size(128)
    x = torch.zeros(1, ph, pw, 3, dtype=torch.uint8, device="cuda")
    x[:, :H, :W] = image
    cfg.infer.score_thresh = threshold_for(model(x.permute(0, 3, 1, 2))[0], CANDIDATES)

    tv = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=80
    )
    tv = tv.cuda().eval()
    tv_images = [image[0].permute(2, 0, 1).float() / 255]
    with torch.autocast("cuda", dtype=torch.float16):
        batched, _ = tv.transform(tv_images)
        tv_logits = tv.head(list(tv.backbone(batched.tensors).values()))["cls_logits"]
    tv.score_thresh = threshold_for([tv_logits], CANDIDATES)
    tv.detections_per_img = cfg.infer.max_det

    def tv_run():
        with torch.autocast("cuda", dtype=torch.float16):
            return tv(tv_images)

    out: dict[str, object] = {"image": [H, W], "precision": "fp16", "channels_last": True}
    out["score_thresh"] = {"retinaflow": cfg.infer.score_thresh, "torchvision": tv.score_thresh}
    out["b1_torchvision_eager_ms"] = float(do_bench(tv_run, warmup=25, rep=200, return_mode="median"))
    out["b1_torchvision_detections"] = int(tv_run()[0]["scores"].numel())
    out["compile"] = args.compile
    if args.compile != "none":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = args.compile == "freezing"
        model = torch.compile(model, dynamic=False)
    for pad in args.pads:
        out[f"pad{pad}_padded"] = list(padded_size(pad))
        for batch in args.batches:
            out.update(measure(model, cfg, image, batch, pad))
            torch.cuda.empty_cache()
        if 1 in args.batches:
            out[f"pad{pad}_b1_speedup_vs_torchvision"] = (
                out["b1_torchvision_eager_ms"] / out[f"pad{pad}_b1_graph_ms"]
            )
    emit("e2e_latency", {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()})


if __name__ == "__main__":
    main()
