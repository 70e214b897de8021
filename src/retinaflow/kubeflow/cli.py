"""``retinaflow pipeline run --local | compile | submit``: plugged into ``retinaflow.cli`` by the lead.

Importing this module does not import kfp; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from retinaflow.errors import ConfigError


def add_pipeline_commands(subparsers: Any) -> None:
    """Add the ``pipeline`` command group to ``retinaflow``'s subparsers."""
    p = subparsers.add_parser("pipeline", help="Kubeflow pipeline: run locally, compile, submit to a cluster")
    sub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    run = sub.add_parser(
        "run",
        help="run the whole pipeline on this machine (--local)",
        description="Runs every pipeline step with kfp.local on this machine (CPU): synthesizes data, "
        "trains, exports, evaluates PyTorch and ONNX, registers a model version in the embedded MLflow.",
    )
    run.add_argument("--local", action="store_true", required=True, help="run with kfp.local (required)")
    run.add_argument("--output", type=Path, default=Path("runs/pipeline"), help="output folder")
    run.add_argument("--images", type=int, default=160, help="synthetic images to generate")
    run.add_argument("--iters", type=int, help="training iterations (default: the synthetic_cpu preset's)")
    run.add_argument("--experiment", default="retinaflow-local", help="MLflow experiment")
    run.add_argument("--model-name", default="retinaflow-demo", help="registered model name")
    _add_param_arg(run)
    run.set_defaults(func=_cmd_run)

    comp = sub.add_parser("compile", help="compile the pipeline and the components to KFP YAML")
    comp.add_argument("--output", type=Path, default=Path("pipelines"), help="pipeline YAML file or folder")
    comp.add_argument("--components-dir", type=Path, help="also write each component's YAML here")
    comp.set_defaults(func=_cmd_compile)

    sm = sub.add_parser(
        "submit",
        help="upload the pipeline to a KFP endpoint and start a run (or a schedule)",
        description="Uploads a new pipeline version and starts a run with kfp.Client; KFP_TOKEN, if set, is "
        "sent as the bearer token. Exits non-zero when --wait sees the run fail.",
    )
    sm.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
    sm.add_argument("--experiment", default="retinaflow", help="KFP experiment (created if missing)")
    _add_param_arg(sm)
    sm.add_argument("--config", help="YAML config (or preset name) turned into pipeline arguments")
    sm.add_argument("--schedule", default="", metavar="CRON", help="create a recurring run (5-field cron)")
    sm.add_argument("--wait", action="store_true", help="follow the run; non-zero exit unless it succeeds")
    sm.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits")
    sm.add_argument("--run-name", default="", help="run name (default: pipeline name + time)")
    sm.add_argument("--version-name", default="", help="pipeline version name (default: name + time + sha)")
    sm.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    sm.add_argument("--package", type=Path, help="submit this compiled YAML instead of compiling now")
    sm.set_defaults(func=_cmd_submit)


def _add_param_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter (repeatable)"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from retinaflow.kubeflow.local import LocalRunOptions, print_summary, run_local
    from retinaflow.kubeflow.params import parse_params

    if args.images < 4:
        raise ConfigError(f"--images must be at least 4, got {args.images}")
    opts = LocalRunOptions(
        output=args.output,
        images=args.images,
        iters=args.iters,
        experiment=args.experiment,
        model_name=args.model_name,
        arguments=parse_params(args.param),
    )
    print_summary(run_local(opts))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from retinaflow.kubeflow.compile import compile_components, compile_pipeline

    print(f"pipeline: {compile_pipeline(args.output)}")
    if args.components_dir:
        for path in compile_components(args.components_dir):
            print(f"component: {path}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from retinaflow.config import Config
    from retinaflow.kubeflow.params import check_arguments, config_arguments, parse_params
    from retinaflow.kubeflow.submit import SubmitOptions, submit

    arguments = config_arguments(Config.load(args.config)) if args.config else {}
    explicit = parse_params(args.param)
    if "overrides" in explicit and "overrides" in arguments:
        explicit["overrides"] = [*arguments["overrides"], *explicit["overrides"]]
    arguments.update(explicit)
    check_arguments(arguments)
    result = submit(
        SubmitOptions(
            host=args.host,
            arguments=arguments,
            experiment=args.experiment,
            version_name=args.version_name,
            run_name=args.run_name,
            schedule=args.schedule,
            wait=args.wait,
            timeout=args.timeout,
            namespace=args.namespace,
            package=args.package,
        )
    )
    print(f"pipeline: {result.pipeline_id}  version: {result.version_id}  experiment: {result.experiment_id}")
    if result.recurring_run_id:
        print(f"recurring run: {result.recurring_run_id}")
    else:
        print(f"run: {result.run_id}" + (f"  state: {result.state}" if result.state else ""))
    return 0
