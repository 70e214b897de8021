"""The optional layers of the CLI: MLflow tracking flags, ``s3://`` paths, and the ``registry`` and
``pipeline`` commands, each imported only when its extras are installed."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from retinaflow.config import Config
from retinaflow.errors import MissingDependency

Handler = Callable[[argparse.Namespace], int]


def _tracking_requested(args: argparse.Namespace) -> bool:
    """``--mlflow``, or ``--tracking-uri`` (which implies it)."""
    return bool(getattr(args, "mlflow", False) or getattr(args, "tracking_uri", None))


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    """``--mlflow --experiment --run-name`` (and friends) when the MLOps extras are installed."""
    try:
        from retinaflow.mlops.cli import add_tracking_args as add_mlflow_args
    except ImportError:
        return
    add_mlflow_args(p)


def tracking_callbacks(args: argparse.Namespace, config: Config) -> list[Any]:
    """The MLflow sink for ``train --mlflow`` (empty without the flag)."""
    if not _tracking_requested(args):
        return []
    try:
        from retinaflow.mlops.cli import make_callbacks
    except ImportError as exc:
        raise MissingDependency("--mlflow needs the MLOps extras: pip install 'retinaflow[mlops]'") from exc
    return list(make_callbacks(args, config))


def tracked(args: argparse.Namespace, kind: str, params: dict[str, Any]) -> Any:
    """An MLflow-tracked command context with ``--mlflow`` (yields the run), else a no-op (yields None)."""
    if not _tracking_requested(args):
        return nullcontext(None)
    from retinaflow.mlops.cli import tracked

    return tracked(args, kind, params)


@contextmanager
def remote(
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


def add_optional_commands(sub: argparse._SubParsersAction) -> None:
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
