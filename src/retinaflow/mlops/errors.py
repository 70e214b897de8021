"""MLOps exceptions: each carries a one-line, secret-free message that the CLI prints as is."""

from __future__ import annotations

from retinaflow.errors import RetinaflowError


class MlopsError(RetinaflowError):
    """Base of the tracking, storage and registry errors."""

    exit_code = 7


class StorageError(MlopsError):
    """An S3 object, prefix or bucket is missing, unreachable or corrupt."""

    exit_code = 8


class StorageAuthError(StorageError):
    """S3 refused the credentials (wrong key or secret, no permission) or found none."""


class TrackingUnavailable(MlopsError):
    """The MLflow tracking server cannot be reached (or refused the request) when a run starts."""

    exit_code = 9


class RegistryError(MlopsError):
    """A registered model, version or alias is missing, or a registration is inconsistent."""

    exit_code = 10
