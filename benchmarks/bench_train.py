"""Training throughput: retinaflow R50-FPN vs torchvision retinanet_resnet50_fpn, same process, same inputs.

Batch 8 at 800x1333 under bf16 autocast (fp16 with GradScaler via --precision fp16), optimizer step
included, each library's own: torchvision's reference SGD; retinaflow's recipe as ``retinaflow train`` runs
it (default: fused AdamW with gradient clipping; ODTK's preset: SGD, no clipping). Prints JSON with both
img/s and the ratio. Issue 2 target: ratio >= 1.5.

    python benchmarks/bench_train.py [--batch 8] [--iters 30] [--precision bf16] [--compile] [--head-norms bn]

``--head-norms`` also times the default recipe with other ``model.head_norm`` values (eager, and compiled
with ``--compile``): what a head norm costs in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from common import emit, time_ms

from retinaflow.config import Config
from retinaflow.engine.optim import build_optimizer
from retinaflow.engine.schedule import autocast_dtype
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.loss import detection_loss
from retinaflow.model.retinanet import build_model

NUM_CLASSES = 80
ODTK_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "retinanet_odtk.yaml"


def random_targets(batch: int, height: int, width: int, per_image: int, gen: torch.Generator):
    xy = torch.rand(batch, per_image, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
    wh = 16 + torch.rand(batch, per_image, 2, generator=gen) * torch.tensor([width * 0.3, height * 0.3])
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.randint(0, NUM_CLASSES, (batch, per_image), generator=gen)
    return boxes, labels


def bench_torchvision(images_u8, boxes, labels, dtype, warmup, iters):
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1
    ).cuda()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    images = [im.float() / 255 for im in images_u8]
    targets = [{"boxes": b.cuda(), "labels": (lab + 1).cuda()} for b, lab in zip(boxes, labels, strict=True)]

    def step():
        with torch.autocast("cuda", dtype=dtype):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    ms = time_ms(step, warmup, iters)
    return ms


def bench_retinaflow(
    images_u8, boxes, labels, dtype, warmup, iters, compile_model, pad=None, odtk=False, head_norm=None
):
    cfg = Config.load(ODTK_RECIPE) if odtk else Config()
    pad = pad or cfg.data.pad_stride  # the recipe's padding unless given
    cfg.model.num_classes = NUM_CLASSES
    cfg.model.head_norm = head_norm or cfg.model.head_norm
    model = build_model(cfg.model).cuda().to(memory_format=torch.channels_last)
    model.train()
    opt = build_optimizer(model.parameters(), cfg.train)  # what the trainer builds
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    b, _, h, w = images_u8.shape
    ph, pw = -(-h // pad) * pad, -(-w // pad) * pad
    batch = torch.zeros(b, 3, ph, pw, dtype=torch.uint8, device="cuda")
    batch[:, :, :h, :w] = images_u8
    batch = batch.contiguous(memory_format=torch.channels_last)
    gt_boxes, gt_labels = boxes.cuda(), labels.cuda()
    anchors = generate_anchors(cfg.model.anchors, (ph, pw), torch.device("cuda"), torch.float32)
    net = torch.compile(model) if compile_model else model

    def step():
        with torch.autocast("cuda", dtype=dtype):
            cls, box = net(batch)
        losses = detection_loss(cls, box, anchors, gt_boxes, gt_labels, cfg.loss, cfg.matcher)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if cfg.train.clip_grad > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
        scaler.step(opt)
        scaler.update()

    ms = time_ms(step, warmup + (10 if compile_model else 0), iters)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1333)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--compile", action="store_true", help="also time retinaflow under torch.compile")
    ap.add_argument("--head-norms", default="", help="comma-separated model.head_norm values to time too")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dtype = autocast_dtype(args.precision, torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (args.batch, 3, args.height, args.width), dtype=torch.uint8, generator=gen
    ).cuda()
    boxes, labels = random_targets(args.batch, args.height, args.width, 12, gen)
    tv = bench_torchvision(images, boxes, labels, dtype, args.warmup, args.iters)
    ours = bench_retinaflow(images, boxes, labels, dtype, args.warmup, args.iters, False)
    out = {
        "precision": args.precision,
        "batch": args.batch,
        "size": [args.height, args.width],
        "torchvision_img_s": round(args.batch * 1000 / tv, 1),
        "retinaflow_img_s": round(args.batch * 1000 / ours, 1),
        "ratio": round(tv / ours, 3),
    }
    # The ODTK recipe (no head norm, smooth L1, no low-quality matches, padding to 128): what the defaults
    # replaced; and the default recipe padded to 128 as it was before data.pad_stride became 32.
    odtk = bench_retinaflow(images, boxes, labels, dtype, args.warmup, args.iters, False, odtk=True)
    out["retinaflow_odtk_recipe_img_s"] = round(args.batch * 1000 / odtk, 1)
    out["ratio_odtk_recipe"] = round(tv / odtk, 3)
    pad128 = bench_retinaflow(images, boxes, labels, dtype, args.warmup, args.iters, False, pad=128)
    out["retinaflow_pad128_img_s"] = round(args.batch * 1000 / pad128, 1)
    out["ratio_pad128"] = round(tv / pad128, 3)
    if args.compile:
        comp = bench_retinaflow(images, boxes, labels, dtype, args.warmup, args.iters, True)
        out["retinaflow_compiled_img_s"] = round(args.batch * 1000 / comp, 1)
        out["ratio_compiled"] = round(tv / comp, 3)
    for norm in filter(None, args.head_norms.split(",")):
        for compiled in (False, True) if args.compile else (False,):
            ms = bench_retinaflow(
                images, boxes, labels, dtype, args.warmup, args.iters, compiled, head_norm=norm
            )
            out[f"retinaflow_{norm}_head{'_compiled' if compiled else ''}_img_s"] = round(
                args.batch * 1000 / ms, 1
            )
    emit("train_throughput", out)


if __name__ == "__main__":
    main()
