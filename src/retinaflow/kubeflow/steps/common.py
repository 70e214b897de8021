"""Helpers shared by the steps: requests from component inputs, s3:// inputs made local, uploads,
the MLflow run of a training."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from retinaflow.errors import MissingDependency, RetinaflowError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    R = TypeVar("R", bound=DataclassInstance)

log = logging.getLogger(__name__)


def request_from(cls: type[R], inputs: Mapping[str, Any]) -> R:
    """The request dataclass ``cls`` filled, field by field, from a component's inputs (its ``locals()``).

    The field list is written once, in ``cls``; the component's signature (which KFP needs spelled
    out) must name every field, or this raises. Lists are copied (``overrides``, ``classes``).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise TypeError(f"{cls.__name__} needs the component input(s) {', '.join(missing)}")
    values = {n: inputs[n] for n in names}
    return cls(**{n: list(v) if isinstance(v, list) else v for n, v in values.items()})


#: Environment variable naming a file where a failing step appends ``{"step", "error"}`` (one JSON
#: line), so that a local pipeline run can say which step failed and why (kfp.local only says "FAILURE").
FAILURE_LOG_ENV = "RETINAFLOW_FAILURE_LOG"

F = TypeVar("F", bound=Callable[..., Any])


def reports_failure(step: str) -> Callable[[F], F]:
    """Decorator for a step's entry function: an exception is recorded (step name and its first line)
    in the file ``$RETINAFLOW_FAILURE_LOG`` names, when set, then raised as before."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                _record_failure(step, exc)
                raise

        return cast(F, run)

    return wrap


def _record_failure(step: str, exc: BaseException) -> None:
    target = os.environ.get(FAILURE_LOG_ENV)
    if not target:
        return
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = text if isinstance(exc, RetinaflowError) else f"{type(exc).__name__}: {text}".rstrip(": ")
    try:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "error": error}) + "\n")
    except OSError:
        log.warning("cannot record the failure of step %s in %s", step, target)


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def local_input(uri: str) -> Path:
    """A local path for ``uri``: itself, or the cached download of an ``s3://`` object or prefix."""
    if not is_remote(uri):
        return Path(uri)
    try:
        from retinaflow.mlops.storage import resolve_input
    except ImportError as exc:
        raise MissingDependency("s3:// dataset and model URIs need pip install 'retinaflow[mlops]'") from exc
    return Path(resolve_input(uri))


def upload(local: Path, uri: str) -> None:
    """Copy a local file or folder to ``uri`` (``s3://``)."""
    try:
        from retinaflow.mlops.storage import upload as _upload
    except ImportError as exc:
        raise MissingDependency("s3:// outputs need pip install 'retinaflow[mlops]'") from exc
    _upload(local, uri)


def tracking_enabled() -> bool:
    """MLflow tracking is on unless ``RETINAFLOW_NO_MLFLOW`` is set or mlflow is not installed."""
    if os.environ.get("RETINAFLOW_NO_MLFLOW"):
        return False
    try:
        import mlflow  # noqa: F401
    except ImportError:
        log.warning("mlflow is not installed: this step is not tracked")
        return False
    return True


def find_run_id(experiment: str, run_name: str) -> str:
    """Id of the newest MLflow run named ``run_name`` in ``experiment``; '' when there is none."""
    import mlflow

    from retinaflow.mlops.settings import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else ""


def remote_exists(uri: str) -> bool:
    """Whether the ``s3://`` object ``uri`` exists."""
    try:
        from retinaflow.mlops.storage import exists
    except ImportError as exc:
        raise MissingDependency("s3:// staging needs pip install 'retinaflow[mlops]'") from exc
    return bool(exists(uri))
