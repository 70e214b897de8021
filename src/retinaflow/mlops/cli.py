"""argparse helpers that ``retinaflow.cli`` plugs in: tracking flags, the MLflow sink, ``s3://`` paths, and
the ``registry`` / ``tracking`` subcommands. Every handler returns an exit code; failures are raised as
:class:`retinaflow.errors.RetinaflowError` subclasses (one line, no secret) for the CLI to print.

Typical ``train`` wiring::

    add_tracking_args(train_parser)
    ...
    paths = resolve_paths(args, inputs=("images", "annotations", "val_images", "val_annotations"),
                          resume=("checkpoint",))
    try:
        train(config, args.checkpoint, callbacks=make_callbacks(args, config, args.checkpoint))
    finally:
        paths.publish()          # checkpoint (+ its MLflow sidecar) back to S3, also after a failure
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from retinaflow.config import Config
from retinaflow.engine.callbacks import Callback
from retinaflow.mlops import storage
from retinaflow.mlops.redact import install_log_redaction
from retinaflow.mlops.settings import DEFAULT_EXPERIMENT, TrackingSettings

log = logging.getLogger(__name__)


# -- tracking ------------------------------------------------------------------------------------------
def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    """``--mlflow``, ``--tracking-uri``, ``--experiment``, ``--run-name``, ``--register-model``,
    ``--mlflow-samples``."""
    g = parser.add_argument_group("MLflow tracking")
    g.add_argument(
        "--mlflow",
        action="store_true",
        help="track this command in MLflow (MLFLOW_TRACKING_URI, "
        "else an embedded sqlite store in the working directory)",
    )
    g.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking server or sqlite:/// URI (implies --mlflow)"
    )
    g.add_argument("--experiment", default=DEFAULT_EXPERIMENT, metavar="NAME", help="MLflow experiment name")
    g.add_argument("--run-name", metavar="NAME", help="MLflow run name")
    g.add_argument(
        "--register-model",
        metavar="NAME",
        help="after training, register the run's model under NAME with the alias 'challenger'",
    )
    g.add_argument(
        "--mlflow-samples",
        type=int,
        default=8,
        metavar="N",
        help="validation images drawn with their detections at the end of training (0: none)",
    )


def tracking_settings(args: argparse.Namespace) -> TrackingSettings | None:
    """Settings from the parsed flags, or None when tracking is off."""
    if not (getattr(args, "mlflow", False) or getattr(args, "tracking_uri", None)):
        return None
    return TrackingSettings(
        tracking_uri=getattr(args, "tracking_uri", None),
        experiment=getattr(args, "experiment", None) or DEFAULT_EXPERIMENT,
        run_name=getattr(args, "run_name", None),
    )


def _fingerprint(config: Config) -> str | None:
    images, annotations = config.data.images, config.data.annotations
    if not images or not annotations or storage.is_s3(images) or storage.is_s3(annotations):
        return None
    from retinaflow.data.validate import fingerprint

    return str(fingerprint(Path(images), Path(annotations)))


def make_callbacks(
    args: argparse.Namespace, config: Config, checkpoint: str | Path | None = None
) -> list[Callback]:
    """The sinks a ``train`` command asked for: ``[MlflowSink]`` with ``--mlflow``, else ``[]`` (also on
    ranks other than 0). Probes the server at once: unreachable -> :class:`TrackingUnavailable`.

    ``checkpoint`` (the local file training writes) names the run-id sidecar that lets a resume continue
    the same run; default: ``args.model`` (for ``s3://`` its :func:`storage.local_output_path`)."""
    from retinaflow.mlops.tracking import MlflowSink, is_rank_zero

    settings = tracking_settings(args)
    if settings is None or not is_rank_zero():
        return []
    install_log_redaction()
    if checkpoint is None and getattr(args, "model", None):
        model = str(args.model)
        checkpoint = storage.local_output_path(model) if storage.is_s3(model) else model
    sink = MlflowSink(
        settings,
        checkpoint=checkpoint,
        dataset_fingerprint=_fingerprint(config),
        sample_images=int(getattr(args, "mlflow_samples", 8)),
        register_as=getattr(args, "register_model", None),
    )
    sink.check()
    return [sink]


def tracked(args: argparse.Namespace, kind: str, params: dict[str, Any] | None = None) -> Any:
    """Context manager for ``infer``/``eval``/``export``: a :class:`~retinaflow.mlops.runs.TrackedRun`
    with ``--mlflow``, else None::

        with tracked(args, "eval", {"detections": args.detections}) as run:
            result = evaluate_detections(...)
            if run:
                run.log_eval(result, annotations=..., detections=..., images=...)
    """
    settings = tracking_settings(args)
    if settings is None or int(os.environ.get("RANK", "0")) != 0:
        return nullcontext(None)
    from retinaflow.mlops.runs import tracked_command

    install_log_redaction()
    return tracked_command(settings, kind, params)


# -- s3:// paths -----------------------------------------------------------------------------------------
class PathResolver:
    """Turns ``s3://`` arguments into local paths and sends outputs back after the command.

    Inputs are downloaded into the cache (:func:`storage.resolve_input`). Outputs get a local path in a
    staging folder; with ``existing=True`` the current object (a checkpoint to resume) and its
    companions (``MODEL.pth.*``: the MLflow sidecar, spilled records) are downloaded there first.
    :meth:`publish` uploads every staged output that exists, with its companions.
    """

    def __init__(self, cache_dir: str | Path | None = None, staging_dir: str | Path | None = None) -> None:
        self.cache_dir = cache_dir
        self.staging = Path(staging_dir) if staging_dir else Path(tempfile.mkdtemp(prefix="retinaflow-out-"))
        self.outputs: list[tuple[Path, str]] = []

    def input(self, value: str | None) -> str | None:
        if not storage.is_s3(value):
            return value
        return str(storage.resolve_input(str(value), self.cache_dir))

    def output(self, value: str | None, existing: bool = False) -> str | None:
        if not storage.is_s3(value):
            return value
        uri = str(value)
        bucket, key = storage.parse(uri)
        local = self.staging / bucket / key
        local.parent.mkdir(parents=True, exist_ok=True)
        if existing and key and not key.endswith("/"):
            prefix_dir = uri.rsplit("/", 1)[0] + "/"
            for obj in _companions(prefix_dir, Path(key).name):
                storage.download(prefix_dir + obj, local.parent / obj)
        self.outputs.append((local, uri))
        return str(local)

    def publish(self) -> list[str]:
        """Upload the staged outputs that exist (files with their ``NAME.*`` companions, folders whole)."""
        written: list[str] = []
        for local, uri in self.outputs:
            if local.is_dir():
                written += storage.upload(local, uri)
            elif local.is_file():
                written += storage.upload(local, uri)
                base = uri.rsplit("/", 1)[0] + "/"
                for companion in sorted(local.parent.glob(local.name + ".*")):
                    if companion.is_file():
                        written += storage.upload(companion, base + companion.name)
        return written

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _companions(prefix_uri: str, name: str) -> list[str]:
    """Names of ``name`` and ``name.*`` objects directly under ``prefix_uri``."""
    bucket, prefix = storage.parse(prefix_uri)
    s3 = storage.client()
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + name):
        for obj in page.get("Contents", []):
            rest = obj["Key"][len(prefix) :]
            if "/" not in rest and (rest == name or rest.startswith(name + ".")):
                found.append(rest)
    return found


def resolve_paths(
    args: argparse.Namespace,
    inputs: Iterable[str] = (),
    outputs: Iterable[str] = (),
    resume: Iterable[str] = (),
    cache_dir: str | Path | None = None,
) -> PathResolver:
    """Replace the ``s3://`` values of the named attributes of ``args`` by local paths (inputs
    downloaded; outputs staged; ``resume`` outputs staged with their current object) and return the
    resolver whose :meth:`~PathResolver.publish` uploads the outputs afterwards. When a download fails,
    the staging folder is removed before the error propagates (the caller never gets the resolver)."""
    resolver = PathResolver(cache_dir)
    try:
        for name in inputs:
            setattr(args, name, resolver.input(getattr(args, name, None)))
        for name in outputs:
            setattr(args, name, resolver.output(getattr(args, name, None)))
        for name in resume:
            setattr(args, name, resolver.output(getattr(args, name, None), existing=True))
    except BaseException:
        resolver.cleanup()
        raise
    return resolver


@contextmanager
def s3_paths(args: argparse.Namespace, **kwargs: Any) -> Iterator[PathResolver]:
    """:func:`resolve_paths` as a context: outputs are published on exit, even after an error.

    Under torchrun only global rank 0 publishes: it alone writes outputs (the checkpoint); another
    rank's staged copy is the checkpoint it resumed from, and uploading it would undo rank 0's."""
    resolver = resolve_paths(args, **kwargs)
    try:
        yield resolver
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            resolver.publish()
        resolver.cleanup()


# -- registry / tracking subcommands ---------------------------------------------------------------------
def _registry_settings(args: argparse.Namespace) -> TrackingSettings:
    install_log_redaction()
    return TrackingSettings(
        tracking_uri=args.tracking_uri, experiment=getattr(args, "experiment", DEFAULT_EXPERIMENT)
    )


def _cmd_promote(args: argparse.Namespace) -> int:
    from retinaflow.mlops.registry import promote

    d = promote(
        args.model,
        args.min_gain,
        args.max_latency_regression,
        _registry_settings(args),
        first_champion_min_map=args.first_champion_min_map,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": d.model,
                    "challenger": d.challenger,
                    "champion_before": d.champion_before,
                    "champion_after": d.champion_after,
                    "promoted": d.promoted,
                    "reasons": d.reasons,
                }
            )
        )
    else:
        print(d.summary())
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from retinaflow.mlops.registry import list_versions

    rows = list_versions(args.model, _registry_settings(args))
    table = Table(title=f"registered model {args.model}")
    for col in (
        "version",
        "aliases",
        "mAP",
        "latency ms",
        "precision",
        "backbone",
        "decision",
        "created",
        "run",
    ):
        table.add_column(col, justify="right" if col in ("version", "mAP", "latency ms") else "left")
    for r in rows:
        table.add_row(
            r.version,
            ",".join(r.aliases),
            "" if r.map is None else f"{r.map:.4f}",
            "" if r.latency_ms is None else f"{r.latency_ms:.2f}",
            r.precision or "",
            r.backbone or "",
            r.decision or "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)),
            (r.run_id or "")[:12],
        )
    Console(width=140).print(table)
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from retinaflow.mlops.registry import ModelFiles, register_model

    resolver = PathResolver()
    try:
        files = ModelFiles(
            resolver.input(args.checkpoint), resolver.input(args.onnx), resolver.input(args.engine)
        )
        mv = register_model(
            args.model, args.run_id, files, args.map, args.latency_ms, settings=_registry_settings(args)
        )
    finally:
        resolver.cleanup()
    print(f"registered {args.model} version {mv.version} (alias challenger) from run {mv.run_id}")
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    """Send each spill file to the server its run lives on: ``--tracking-uri`` when given, else the URI
    saved with the records (or in the checkpoint's sidecar), else the default."""
    from retinaflow.mlops.runs import connect, describe, pending_files, replay_file, saved_uri
    from retinaflow.mlops.tracking import sidecar_for

    install_log_redaction()
    target = Path(args.path)
    files = pending_files(target if target.is_dir() else sidecar_for(target))
    complete = True
    for path in files:
        settings = TrackingSettings(tracking_uri=args.tracking_uri or saved_uri(path))
        client, uri = connect(settings)
        report = replay_file(client, uri, settings, path)
        print(describe(report, uri))
        complete = complete and report.complete
    if not files:
        print(f"nothing to send: no spilled MLflow records for {target}")
    return 0 if complete else 1


def add_registry_commands(subparsers: Any) -> None:
    """``retinaflow registry promote|list|register`` and ``retinaflow tracking sync``; each leaf sets
    ``func`` (``args.func(args) -> int``)."""
    reg = subparsers.add_parser("registry", help="MLflow model registry: register, promote, list")
    sub = reg.add_subparsers(dest="registry_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, metavar="NAME", help="registered model name")
        p.add_argument(
            "--tracking-uri", metavar="URI", help="default: MLFLOW_TRACKING_URI or the embedded store"
        )

    p = sub.add_parser("promote", help="move 'champion' to the challenger if it passes the gate")
    common(p)
    p.add_argument("--min-gain", type=float, default=0.005, help="mAP the challenger must gain (absolute)")
    p.add_argument(
        "--max-latency-regression", type=float, default=0.1, help="allowed latency increase (0.1 = 10%%)"
    )
    p.add_argument(
        "--first-champion-min-map",
        type=float,
        default=0.0,
        help="with no champion yet, the mAP the first model must exceed to become champion (default 0)",
    )
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("list", help="versions, aliases and metrics as a table")
    common(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("register", help="register a run's model (or files) as the new challenger")
    common(p)
    p.add_argument("--run-id", help="MLflow run holding model/ artifacts (a new run is created without it)")
    p.add_argument("--checkpoint", help="checkpoint to add (local or s3://)")
    p.add_argument("--onnx", help="ONNX model to add (local or s3://)")
    p.add_argument("--engine", help="TensorRT engine to add (local or s3://)")
    p.add_argument("--map", type=float, help="mAP (default: the run's final/mAP or val/AP metric)")
    p.add_argument("--latency-ms", type=float, help="measured latency in ms")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment for a new run")
    p.set_defaults(func=_cmd_register)

    trk = subparsers.add_parser("tracking", help="MLflow tracking maintenance")
    tsub = trk.add_subparsers(dest="tracking_command", required=True)
    p = tsub.add_parser("sync", help="send MLflow records spilled while the server was down")
    p.add_argument("path", help="the checkpoint (MODEL.pth) or a folder holding *.pending-*.json files")
    p.add_argument("--tracking-uri", metavar="URI")
    p.set_defaults(func=_cmd_sync)
