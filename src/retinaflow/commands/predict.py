"""``retinaflow infer`` and ``eval`` (``export``: :mod:`retinaflow.commands.export`)."""

from __future__ import annotations

import argparse

from retinaflow.commands.optional import add_tracking_args, remote, tracked
from retinaflow.flags import INFER_FLAGS, add_flags, given


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="detect objects in a folder of images",
        description="Batched inference with AMP, GPU decode + NMS; writes COCO results JSON and, with "
        "--annotations, evaluates them. Settings not given as flags are the checkpoint's (its infer.* "
        "config, defaults unless changed at training time).",
    )
    p.add_argument("model", help="checkpoint (.pth) or exported engine (.pt2, .onnx, .plan)")
    p.add_argument("--images", required=True, help="images folder")
    p.add_argument("--annotations", help="ground truth COCO JSON (evaluates the detections)")
    p.add_argument("--output", required=True, help="detections JSON to write")
    p.add_argument("--report", help="evaluation report JSON (with --annotations)")
    add_flags(p, INFER_FLAGS)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    add_tracking_args(p)
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from retinaflow.commands.export import check_engine_flags
    from retinaflow.engine.evaluate import render_table, write_report
    from retinaflow.engine.infer import infer
    from retinaflow.export.engine_infer import infer_engine
    from retinaflow.export.engines import is_engine

    overrides = {key.split(".", 1)[1]: value for key, value in given(args, INFER_FLAGS).items()}
    target = args.output
    params = {"checkpoint": args.model, "images": args.images, **overrides}
    with (
        remote(args, inputs=("model", "images", "annotations"), outputs=("output", "report")),
        tracked(args, "infer", params) as run,
    ):
        if is_engine(args.model):  # .pt2/.onnx/.plan: post-processing and resize are baked into the engine
            check_engine_flags(args)
            result = infer_engine(
                args.model, args.images, args.output, args.annotations, args.device, overrides
            )
        else:
            result = infer(
                args.model, args.images, args.output, None, args.annotations, args.device, overrides
            )
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
    add_tracking_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from retinaflow.engine.evaluate import evaluate_detections, render_table, write_report

    params = {"annotations": args.annotations, "detections": args.detections}
    with (
        remote(args, inputs=("annotations", "detections"), outputs=("output",)),
        tracked(args, "eval", params) as run,
    ):
        result = evaluate_detections(args.annotations, args.detections)
        print(render_table(result))
        if args.output:
            write_report(result, args.output)
        if run is not None:
            run.log_eval(result, args.annotations, args.detections)
    if args.output:
        print(f"report: {args.output}")
    print(f"mAP: {result.map:.4f}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    for add in (_add_infer, _add_eval):
        add(sub)
