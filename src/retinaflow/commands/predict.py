"""``retinaflow infer`` and ``eval`` (``export``: :mod:`retinaflow.commands.export`)."""

from __future__ import annotations

import argparse

from retinaflow.commands.optional import add_tracking_args, remote, tracked


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="detect objects in a folder of images",
        description="Batched inference with AMP, GPU decode + NMS; writes COCO results JSON and, with "
        "--annotations, evaluates them. Settings not given as flags are the checkpoint's (its infer.* "
        "config, defaults unless changed at training time).",
    )
    p.add_argument("model", help="checkpoint (.pth) or exported engine (.pt2, .onnx)")
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
    p.add_argument("--pad-stride", type=int, help="pad batches to a multiple of this (default 32)")
    p.add_argument(
        "--cuda-graph", action="store_true", help="replay the network + post-processing as a CUDA graph"
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile the network (default backend inductor; compiles once per input shape)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument(
        "--loader",
        choices=["auto", "dali", "torch"],
        help="data loader (default auto: dali on GPUs if installed)",
    )
    p.add_argument("--cudnn-benchmark", choices=["auto", "on", "off"], help="cuDNN autotuning (default auto)")
    add_tracking_args(p)
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from retinaflow.commands.export import check_engine_flags
    from retinaflow.engine.evaluate import render_table, write_report
    from retinaflow.engine.infer import infer
    from retinaflow.export.engine_infer import infer_engine
    from retinaflow.export.engines import is_engine

    names = ("batch", "resize", "max_size", "precision", "score_thresh", "nms_iou", "max_det", "top_n")
    overrides = {
        n: getattr(args, n)
        for n in (*names, "pad_stride", "compile", "loader", "cudnn_benchmark")
        if getattr(args, n) is not None
    }
    if args.cuda_graph:
        overrides["cuda_graph"] = True
    target = args.output
    params = {"checkpoint": args.model, "images": args.images, **overrides}
    with (
        remote(args, inputs=("model", "images", "annotations"), outputs=("output", "report")),
        tracked(args, "infer", params) as run,
    ):
        if is_engine(args.model):  # .pt2 / .onnx: post-processing and resize are baked into the engine
            check_engine_flags(args)
            result = infer_engine(
                args.model, args.images, args.output, args.annotations, args.batch, args.device
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
