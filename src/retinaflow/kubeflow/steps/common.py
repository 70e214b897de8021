"""Helpers shared by the steps: s3:// inputs made local, uploads, the MLflow run of a training."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from retinaflow.errors import MissingDependency

log = logging.getLogger(__name__)


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
