"""Where runs go (server or embedded sqlite), whether the server answers, and what describes a run.

Tracking URI resolution, in order: an explicit URI (``--tracking-uri``), ``MLFLOW_TRACKING_URI``, else the
embedded default: ``sqlite:///<project>/mlruns.db`` with artifacts in ``<project>/mlartifacts`` (MLflow
>= 3.13 refuses its plain file store), ``<project>`` being ``RETINAFLOW_PROJECT_DIR`` or the working
directory. The registry always uses the tracking URI.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from retinaflow.mlops.redact import redact

DEFAULT_EXPERIMENT = "retinaflow"


@dataclass
class TrackingSettings:
    """How a sink or a command talks to MLflow.

    ``tracking_uri`` None: ``MLFLOW_TRACKING_URI`` or the embedded sqlite default. ``flush_timeout``:
    seconds the end of a run waits for a down server before spilling what is left to the sidecar file.
    ``probe_interval``: seconds between reachability probes while the server is down.
    ``system_metrics_interval``: seconds between CPU/RAM/GPU samples (0 disables system metrics).
    ``max_buffered_records``: records a run keeps in memory while the server is unreachable; beyond it
    the oldest metric records are dropped (and reported). One record is one ``log_metrics`` call (or a
    params/tags/artifact/status record); the default holds hours of per-iteration logging.
    """

    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    system_metrics_interval: float = 10.0
    flush_timeout: float = 120.0
    probe_interval: float = 2.0
    probe_timeout: float = 3.0
    max_buffered_records: int = 100_000

    def resolved_uri(self) -> str:
        return resolve_tracking_uri(self.tracking_uri)


def project_dir() -> Path:
    return Path(os.environ.get("RETINAFLOW_PROJECT_DIR") or Path.cwd()).resolve()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use (see module doc); the embedded default creates its folder.

    Credentials written into an HTTP(S) URI (``https://user:password@host``) are moved to
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (MLflow's own basic-auth variables, unless
    already set) and the URI is returned without them, so that MLflow never prints or logs them.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return _move_credentials(chosen)
    root = project_dir()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlruns.db'}"


def _move_credentials(uri: str) -> str:
    if not is_remote(uri):
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(parts.username))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(parts.password))
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_remote(uri: str) -> bool:
    """True for an HTTP(S) tracking server (the only kind that can go away mid-run)."""
    return uri.startswith(("http://", "https://"))


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact root for a new experiment: local folder next to a sqlite DB, the server's choice otherwise."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        return (db.parent / "mlartifacts" / safe).resolve().as_uri()
    return None


def probe(uri: str, timeout: float = 3.0) -> str | None:
    """Check that a tracking server answers. Returns None when reachable, else a one-line reason.

    Any HTTP answer (even 401/404) counts as reachable: only connection failures and timeouts mean the
    server is down. Non-HTTP URIs (sqlite) are always reachable.
    """
    if not is_remote(uri):
        return None
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # credentials are not needed to see that it answers
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return redact(f"{type(reason).__name__}: {reason}".splitlines()[0])


def sqlite_problem(uri: str) -> str | None:
    """Why the sqlite store of ``uri`` cannot be written (its folder cannot be created or written, or
    the database file is read-only), else None; None for other URIs. Checked before MLflow touches it:
    MLflow retries an unopenable database for minutes and then reports a generic OperationalError."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if str(db) in ("", ":memory:"):
        return None
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=db.parent):
            pass
    except OSError as exc:
        return f"folder {db.parent} is not writable ({exc.strerror or type(exc).__name__})"
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        return f"database {db} is not writable"
    return None


def git_commit(path: Path | None = None) -> str | None:
    """Commit of the git checkout holding ``path`` (default: the retinaflow sources), ``-dirty`` if
    modified; None outside a checkout or without git."""
    where = path or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on (absent ones are skipped)."""
    out = {"python": platform.python_version()}
    for dist in (
        "retinaflow",
        "torch",
        "torchvision",
        "numpy",
        "pycocotools",
        "onnx",
        "onnxruntime",
        "mlflow",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_description(extra: dict[str, Any] | None = None) -> str:
    """The accelerator a run uses: ``extra['device']`` when the trainer reports it, else the first CUDA
    device's name, else the CPU. Reporting only: nothing dispatches on it."""
    if extra and extra.get("device"):
        return str(extra["device"])
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.01}}`` -> ``{"train.lr": 0.01}``; lists become comma-joined strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out
