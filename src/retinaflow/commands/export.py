"""``retinaflow export``: a checkpoint to an ONNX graph or an AOTInductor (.pt2) engine."""

from __future__ import annotations

import argparse

from retinaflow.commands.optional import add_tracking_args, remote, tracked
from retinaflow.config import Config, ExportConfig
from retinaflow.errors import ConfigError
from retinaflow.export.spec import check_size
from retinaflow.flags import EXPORT_FLAGS, add_flags, apply_flags


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (.onnx) or an AOTInductor engine (.pt2)",
        description="The format follows OUT's extension: .onnx (network + decode + NMS in standard ONNX "
        "ops, checked in ONNX Runtime), .pt2 (torch.export + AOTInductor; uint8 images in, detections out) "
        "or .plan (TensorRT). Size, batch range and precision default from the checkpoint. --precision int8 "
        "(.onnx, .plan) calibrates ModelOpt int8 quantizers on training images and writes Q/DQ nodes.",
    )
    p.add_argument("model", help="checkpoint (.pth)")
    p.add_argument("output", help="engine to write: model.onnx, model.pt2 or model.plan")
    p.add_argument(
        "--batch", type=int, nargs="+", metavar="N", help="batch size, or MIN MAX range (default 1 32)"
    )
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (multiples of 32)")
    p.add_argument(
        "--no-postprocess",
        dest="postprocess",
        action="store_false",
        help="ONNX: network only, raw head maps out (the TensorRT plugin route)",
    )
    p.add_argument("--with-postprocess", dest="postprocess", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--static-batch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", help=".pt2: cpu or cuda[:N] to compile for (default: cuda if present)")
    p.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository entry")
    p.add_argument("--triton-name", default="retinaflow", help="model name in the Triton repository")
    p.set_defaults(postprocess=True)
    add_flags(p, EXPORT_FLAGS)
    add_tracking_args(p)
    p.set_defaults(func=_cmd_export)


def export_config(args: argparse.Namespace) -> ExportConfig:
    """The ExportConfig the flags ask for (0 size: the checkpoint's default)."""
    cfg = apply_flags(Config(), args, EXPORT_FLAGS).export
    cfg.postprocess = args.postprocess
    if args.size:
        cfg.height, cfg.width = args.size
        check_size(cfg.height, cfg.width)  # before the checkpoint is read: the cheap mistake first
    if args.batch:
        if len(args.batch) > 2:
            raise ConfigError(f"--batch takes one size or MIN MAX, got {len(args.batch)} values")
        cfg.min_batch, cfg.max_batch = args.batch[0], args.batch[-1]
    cfg.dynamic_batch = cfg.min_batch != cfg.max_batch and not args.static_batch
    return cfg


def _cmd_export(args: argparse.Namespace) -> int:
    from retinaflow.export.api import export

    cfg = export_config(args)
    target = args.output
    params = {"checkpoint": args.model, **cfg.__dict__}
    with remote(args, inputs=("model",), outputs=("output",)), tracked(args, "export", params) as run:
        result = export(
            args.model, args.output, cfg, device=args.device, precision_given=bool(args.precision)
        )
        if args.triton_repo:
            from retinaflow.export.triton import write_model_repository

            entry = write_model_repository(result, args.triton_repo, args.triton_name)
            print(f"triton: {entry}")
        if run is not None:
            run.log_artifact(args.output, result.spec.format)
    print(f"{result.spec.format}: {target}")
    return 0


def check_engine_flags(args: argparse.Namespace) -> None:
    """ConfigError for ``retinaflow infer ENGINE`` flags that an exported engine fixes at export time."""
    from retinaflow.export.engine_infer import ENGINE_INFER_KEYS
    from retinaflow.flags import INFER_FLAGS, given

    fixed = [
        f.option
        for f in INFER_FLAGS
        if f.key in given(args, INFER_FLAGS) and f.key.split(".", 1)[1] not in ENGINE_INFER_KEYS
    ]
    if fixed:
        raise ConfigError(
            f"{fixed[0]} is fixed in the engine {args.model} when it is exported: drop it, or re-export from "
            "the checkpoint with the setting in its config (or run the checkpoint)"
        )
