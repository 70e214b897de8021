"""``retinaflow data synth|real|validate``, ``backbones`` and ``demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retinaflow.commands.optional import remote
from retinaflow.errors import ConfigError


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools: synth, real, validate")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{synth,real,validate}")
    s = dsub.add_parser(
        "synth",
        help="write a deterministic synthetic detection dataset",
        description="Shapes of several classes on textured backgrounds, JPEG + COCO JSON, with a val split.",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--images", type=int, default=200, help="number of images (train + val)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="share of images in the val split")
    s.add_argument(
        "--sizes",
        choices=["small", "coco"],
        default="small",
        help="image sizes: small (192-320 px a side) or coco (640x480, 480x640, 500x375, 1024x768, ...)",
    )
    s.add_argument("--workers", type=int, default=1, help="processes drawing images")
    s.set_defaults(func=_cmd_synth)
    r = dsub.add_parser(
        "real",
        help="write a deterministic detection dataset composed from real photographs",
        description="Real objects (faces, a cat, a cup, rockets, a motorcycle, a pagoda, a flower, coins) "
        "cut from the sample photos shipped in scikit-image and scikit-learn, pasted with masks onto real "
        "backgrounds with real distractors; JPEG + COCO JSON, train and val splits.",
    )
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--train-images", type=int, default=4000)
    r.add_argument("--val-images", type=int, default=400)
    r.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    r.add_argument("--workers", type=int, default=0, help="processes (0: this one); output is the same")
    r.set_defaults(func=_cmd_real)
    v = dsub.add_parser(
        "validate",
        help="check a COCO dataset, drop bad entries, report counts",
        description="Drops annotations with unknown categories, boxes outside the image or of zero area, "
        "missing and corrupt images; writes the cleaned JSON and a report.",
    )
    v.add_argument("--images", required=True)
    v.add_argument("--annotations", required=True)
    v.add_argument("--out-annotations", required=True, help="cleaned COCO JSON to write")
    v.add_argument("--report", help="report JSON to write")
    v.set_defaults(func=_cmd_validate)


def _cmd_synth(args: argparse.Namespace) -> int:
    from retinaflow.data.synthetic import COCO_SIZES, SynthConfig, generate

    if args.images < 2:
        raise ConfigError("--images must be at least 2 (train and val)")
    if not 0 < args.val_fraction < 1:
        raise ConfigError("--val-fraction must be between 0 and 1")
    cfg = SynthConfig(out=Path(args.out), images=args.images, seed=args.seed, val_fraction=args.val_fraction)
    if args.sizes == "coco":
        cfg.sizes = COCO_SIZES
    cfg.workers = args.workers
    paths = generate(cfg)
    for name in ("train_images", "train_annotations", "val_images", "val_annotations"):
        print(f"{name}: {getattr(paths, name)}")
    return 0


def _cmd_real(args: argparse.Namespace) -> int:
    from retinaflow.data.real import RealConfig, generate

    cfg = RealConfig(
        out=Path(args.out),
        train_images=args.train_images,
        val_images=args.val_images,
        seed=args.seed,
        workers=args.workers,
    )
    paths = generate(cfg)
    for name in ("train_images", "train_annotations", "val_images", "val_annotations"):
        print(f"{name}: {getattr(paths, name)}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from retinaflow.data.validate import validate_dataset

    with remote(args, inputs=("images", "annotations"), outputs=("out_annotations", "report")):
        report = validate_dataset(args.images, args.annotations, Path(args.out_annotations))
        text = json.dumps(report, indent=2, default=str)
        if args.report:
            Path(args.report).write_text(text)
    print(text)
    return 0


# -- misc ----------------------------------------------------------------------------------------
def _add_backbones(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the registered backbones")
    p.set_defaults(func=_cmd_backbones)


def _cmd_backbones(args: argparse.Namespace) -> int:
    from retinaflow.model.backbones import available_backbones

    print("\n".join(available_backbones()))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the core-only job (no MLflow/Kubeflow): synthesize, train, evaluate, export",
        description="Synthesizes a small dataset, trains a small detector on the CPU for a few minutes, "
        "evaluates it and exports ONNX; prints the mAP and where the outputs are. `make demo` runs the "
        "same steps as the full Kubeflow pipeline (`retinaflow pipeline run --local`).",
    )
    p.add_argument("--output", default="runs/demo", help="output folder")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the preset's)")
    p.add_argument("--images", type=int, default=240, help="synthetic images to generate")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from retinaflow.demo import run_demo

    if args.images < 4:
        raise ConfigError("--images must be at least 4")
    run_demo(Path(args.output), iters=args.iters, images=args.images)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    for add in (_add_data, _add_backbones, _add_demo):
        add(sub)
