"""``retinaflow`` command line: each subcommand maps flags onto a config and calls one library function.

Errors raised by the library (retinaflow.errors) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from retinaflow import __version__
from retinaflow.config import Config, ExportConfig
from retinaflow.errors import ConfigError, MissingDependency, RetinaflowError

log = logging.getLogger("retinaflow")

Handler = Callable[[argparse.Namespace], int]


# -- train ---------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector (resumes if MODEL exists)",
        description="Train RetinaNet on a COCO-format dataset. If MODEL already exists, training resumes "
        "from it exactly. Launch with `torchrun --nproc_per_node N -m retinaflow train ...` "
        "for several GPUs.",
    )
    p.add_argument("model", help="checkpoint to write (and to resume from if it exists); may be s3://")
    data = p.add_argument_group("data")
    data.add_argument("--images", help="training images folder")
    data.add_argument("--annotations", help="training COCO instances JSON")
    data.add_argument("--val-images", help="validation images folder")
    data.add_argument("--val-annotations", help="validation COCO instances JSON")
    data.add_argument("--resize", type=int, help="eval shorter side (default 800)")
    data.add_argument("--max-size", type=int, help="cap on the longer side (default 1333)")
    data.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="train shorter side range")
    data.add_argument("--workers", type=int, help="DataLoader worker processes per rank")
    model = p.add_argument_group("model")
    model.add_argument(
        "--backbone", help="backbone name, e.g. resnet50, mobilenet_v2 (see `retinaflow backbones`)"
    )
    model.add_argument("--classes", type=int, help="expected number of classes (checked against the dataset)")
    model.add_argument(
        "--backbone-weights", help="local ImageNet weights .pth for the backbone, or 'offline' (MobileNetV2)"
    )
    model.add_argument("--fine-tune", metavar="CKPT", help="start from a checkpoint (class count may differ)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--iters", type=int, help="iterations (default 90000)")
    opt.add_argument("--batch", type=int, help="global batch size over all ranks (default 16)")
    opt.add_argument("--lr", type=float, help="base learning rate (default 0.01)")
    opt.add_argument("--schedule", type=float, help="scale iters-based warmup/milestones (ODTK --schedule)")
    opt.add_argument("--warmup", type=int, help="warmup iterations (default 1000)")
    opt.add_argument("--milestones", type=int, nargs="+", help="lr decay iterations (default 60000 80000)")
    opt.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="mixed precision")
    opt.add_argument("--clip-grad", type=float, help="max gradient norm (0 = off)")
    opt.add_argument("--seed", type=int, help="random seed")
    run = p.add_argument_group("run")
    run.add_argument("--val-every", type=int, help="validate every N iterations (0 = at the end only)")
    run.add_argument("--checkpoint-every", type=int, help="checkpoint every N iterations")
    run.add_argument("--log-every", type=int, help="log metrics every N iterations")
    _add_config_args(p)
    _add_tracking_args(p)
    p.set_defaults(func=_cmd_train)


_TRAIN_FLAGS = {
    "images": "data.images",
    "annotations": "data.annotations",
    "val_images": "data.val_images",
    "val_annotations": "data.val_annotations",
    "resize": "data.resize",
    "max_size": "data.max_size",
    "jitter": "data.jitter",
    "workers": "data.workers",
    "backbone": "model.backbone",
    "backbone_weights": "train.backbone_weights",
    "fine_tune": "train.fine_tune",
    "iters": "train.iters",
    "batch": "train.batch",
    "lr": "train.lr",
    "schedule": "train.schedule",
    "warmup": "train.warmup",
    "milestones": "train.milestones",
    "precision": "train.precision",
    "clip_grad": "train.clip_grad",
    "seed": "train.seed",
    "val_every": "train.val_every",
    "checkpoint_every": "train.checkpoint_every",
    "log_every": "train.log_every",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", help="YAML config (see configs/); flags override it")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. loss.gamma=1.5",
    )


def _load_config(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    config = Config.load(args.config) if args.config else Config()
    overrides = []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return config.override(overrides + list(args.set))


def _cmd_train(args: argparse.Namespace) -> int:
    from retinaflow.engine.train import train

    config = _load_config(args, _TRAIN_FLAGS)
    target = args.model
    data = config.data
    for name in _DATA_PATHS:  # paths may come from the YAML config: resolve them like flags
        setattr(args, name, getattr(data, name))
    with _remote(args, inputs=_DATA_PATHS, resume=("model",)):
        for name in _DATA_PATHS:
            value = getattr(args, name)
            setattr(data, name, None if value is None else str(value))
        callbacks = _tracking_callbacks(args, config)
        if args.classes is not None:
            callbacks.append(_ClassCountCheck(args.classes))
        train(config, Path(args.model), callbacks)
    print(f"checkpoint: {target}")
    return 0


_DATA_PATHS = ("images", "annotations", "val_images", "val_annotations")


class _ClassCountCheck:
    """Fails fast when --classes disagrees with the dataset's category count."""

    def __init__(self, expected: int) -> None:
        self.expected = expected

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_start(self, state: Any) -> None:
        found = state.config.model.num_classes
        if found != self.expected:
            raise ConfigError(f"--classes {self.expected} but the annotations define {found} categories")


# -- infer / eval / export -----------------------------------------------------------------------
def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="detect objects in a folder of images",
        description="Batched inference with AMP, GPU decode + NMS; writes COCO results JSON and, with "
        "--annotations, evaluates them.",
    )
    p.add_argument("model", help="checkpoint")
    p.add_argument("--images", required=True, help="images folder")
    p.add_argument("--annotations", help="ground truth COCO JSON (evaluates the detections)")
    p.add_argument("--output", required=True, help="detections JSON to write")
    p.add_argument("--report", help="evaluation report JSON (with --annotations)")
    p.add_argument("--batch", type=int, help="images per batch (default 8)")
    p.add_argument("--resize", type=int, help="shorter side (default 800)")
    p.add_argument("--max-size", type=int, help="cap on the longer side (default 1333)")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="autocast precision")
    p.add_argument("--score-thresh", type=float, help="minimum score (default 0.05)")
    p.add_argument("--nms-iou", type=float, help="NMS IoU threshold (default 0.5)")
    p.add_argument("--max-det", type=int, help="detections per image (default 100)")
    p.add_argument("--top-n", type=int, help="candidates per level before NMS (default 1000)")
    p.add_argument(
        "--cuda-graph", action="store_true", help="replay the network + post-processing as a CUDA graph"
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    _add_tracking_args(p)
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from retinaflow.config import InferConfig
    from retinaflow.engine.evaluate import render_table, write_report
    from retinaflow.engine.infer import infer

    cfg = InferConfig()
    for name in ("batch", "resize", "max_size", "precision", "score_thresh", "nms_iou", "max_det", "top_n"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.cuda_graph = args.cuda_graph
    target = args.output
    params = {"checkpoint": args.model, "images": args.images, **cfg.__dict__}
    with (
        _remote(args, inputs=("model", "images", "annotations"), outputs=("output", "report")),
        _tracked(args, "infer", params) as run,
    ):
        result = infer(args.model, args.images, args.output, cfg, args.annotations, args.device)
        print(f"detections: {target}")
        if result is not None:
            print(render_table(result))
            if args.report:
                write_report(result, args.report)
            print(f"mAP: {result.map:.4f}")
        if run is not None:
            run.log_artifact(args.output, "detections")
            if result is not None:
                run.log_eval(result, args.annotations, args.output, args.images)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="COCO-evaluate a detections JSON",
        description="pycocotools COCOeval: the 12 summary stats and AP per class, as a table and JSON.",
    )
    p.add_argument("--annotations", required=True, help="ground truth COCO instances JSON")
    p.add_argument("--detections", required=True, help="COCO results JSON")
    p.add_argument("--output", help="report JSON to write")
    _add_tracking_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from retinaflow.engine.evaluate import evaluate, render_table, write_report

    params = {"annotations": args.annotations, "detections": args.detections}
    with (
        _remote(args, inputs=("annotations", "detections"), outputs=("output",)),
        _tracked(args, "eval", params) as run,
    ):
        result = evaluate(args.annotations, args.detections)
        print(render_table(result))
        if args.output:
            write_report(result, args.output)
        if run is not None:
            run.log_eval(result, args.annotations, args.detections)
    if args.output:
        print(f"report: {args.output}")
    print(f"mAP: {result.map:.4f}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX",
        description="Backbone + FPN + heads to ONNX (dynamic batch), checked with the ONNX checker and "
        "against PyTorch in ONNX Runtime.",
    )
    p.add_argument("model", help="checkpoint")
    p.add_argument("output", help="model.onnx to write")
    p.add_argument("--opset", type=int, default=ExportConfig.opset, help="ONNX opset (>= 17)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=(800, 1344),
        help="input size (multiples of 128)",
    )
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension")
    _add_tracking_args(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from retinaflow.export.onnx import export_onnx

    cfg = ExportConfig(
        opset=args.opset, height=args.size[0], width=args.size[1], dynamic_batch=not args.static_batch
    )
    target = args.output
    params = {"checkpoint": args.model, **cfg.__dict__}
    with _remote(args, inputs=("model",), outputs=("output",)), _tracked(args, "export", params) as run:
        export_onnx(args.model, args.output, cfg)
        if run is not None:
            run.log_artifact(args.output, "onnx")
    print(f"onnx: {target}")
    return 0


# -- data ----------------------------------------------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools: synth, validate")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{synth,validate}")
    s = dsub.add_parser(
        "synth",
        help="write a deterministic synthetic detection dataset",
        description="Shapes of several classes on textured backgrounds, JPEG + COCO JSON, with a val split.",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--images", type=int, default=200, help="number of images (train + val)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="share of images in the val split")
    s.set_defaults(func=_cmd_synth)
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
    from retinaflow.data.synthetic import SynthConfig, generate

    if args.images < 2:
        raise ConfigError("--images must be at least 2 (train and val)")
    if not 0 < args.val_fraction < 1:
        raise ConfigError("--val-fraction must be between 0 and 1")
    paths = generate(
        SynthConfig(out=Path(args.out), images=args.images, seed=args.seed, val_fraction=args.val_fraction)
    )
    for name in ("train_images", "train_annotations", "val_images", "val_annotations"):
        print(f"{name}: {getattr(paths, name)}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from retinaflow.data.validate import validate_dataset

    with _remote(args, inputs=("images", "annotations"), outputs=("out_annotations", "report")):
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
        help="the main job on the embedded default: synthesize, train, evaluate, export",
        description="Synthesizes a small dataset, trains a small detector on the CPU for a few minutes, "
        "evaluates it and exports ONNX; prints the mAP and where the outputs are.",
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


# -- optional layers: MLflow/S3 and Kubeflow -------------------------------------------------------
def _add_tracking_args(p: argparse.ArgumentParser) -> None:
    try:
        from retinaflow.mlops.cli import add_tracking_args
    except ImportError:
        return
    add_tracking_args(p)


def _tracking_callbacks(args: argparse.Namespace, config: Config) -> list[Any]:
    if not getattr(args, "mlflow", False):
        return []
    try:
        from retinaflow.mlops.cli import make_callbacks
    except ImportError as exc:
        raise MissingDependency("--mlflow needs the MLOps extras: pip install 'retinaflow[mlops]'") from exc
    return list(make_callbacks(args, config))


def _tracked(args: argparse.Namespace, kind: str, params: dict[str, Any]) -> Any:
    """An MLflow-tracked command context with ``--mlflow`` (yields the run), else a no-op (yields None)."""
    if not getattr(args, "mlflow", False):
        return nullcontext(None)
    from retinaflow.mlops.cli import tracked

    return tracked(args, kind, params)


@contextmanager
def _remote(
    args: argparse.Namespace,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    resume: Sequence[str] = (),
) -> Iterator[None]:
    """Replace ``s3://`` values of the named ``args`` by local paths (inputs downloaded, ``resume``
    outputs downloaded if they exist) and upload the outputs on exit, also after an error."""
    names = (*inputs, *outputs, *resume)
    if not any(str(getattr(args, n, None) or "").startswith("s3://") for n in names):
        yield
        return
    try:
        from retinaflow.mlops.cli import s3_paths
    except ImportError as exc:
        raise MissingDependency("s3:// paths need the MLOps extras: pip install 'retinaflow[mlops]'") from exc
    with s3_paths(args, inputs=inputs, outputs=outputs, resume=resume):
        yield


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    for module, func, name, extra in (
        ("retinaflow.mlops.cli", "add_registry_commands", "registry", "mlops"),
        ("retinaflow.kubeflow.cli", "add_pipeline_commands", "pipeline", "pipeline"),
    ):
        try:
            mod = __import__(module, fromlist=[func])
            getattr(mod, func)(sub)
        except ImportError:
            p = sub.add_parser(name, help=f"(needs pip install 'retinaflow[{extra}]')")
            p.set_defaults(func=_missing(f"`retinaflow {name}` needs pip install 'retinaflow[{extra}]'"))


def _missing(message: str) -> Handler:
    def fail(args: argparse.Namespace) -> int:
        raise MissingDependency(message)

    return fail


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retinaflow",
        description="RetinaNet/FPN object detection: train, infer, evaluate, export; MLflow and Kubeflow.",
    )
    parser.add_argument("--version", action="version", version=f"retinaflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_infer, _add_eval, _add_export, _add_data, _add_backbones, _add_demo):
        add(sub)
    _add_optional_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except RetinaflowError as exc:
        if args.verbose:
            raise
        print(f"retinaflow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("retinaflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure we did not anticipate: still one line, with a pointer
        if args.verbose or os.environ.get("RETINAFLOW_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"retinaflow: error: {type(exc).__name__}: {first} (rerun with -v for the traceback)",
            file=sys.stderr,
        )
        return 1
