"""The model registry: versions with their evidence as tags, aliases ``challenger``/``champion`` (not the
deprecated stages), and the promotion gate.

- :func:`register` makes a finished run's ``model/`` artifacts (checkpoint, ONNX, later the TensorRT
  engine) a new version of a registered model, tagged with ``map``, ``latency_ms`` (when measured),
  ``precision``, ``backbone``, ``dataset_fingerprint``, ``git_commit``, and points ``challenger`` at it.
  Concurrent registrations are safe: version numbers come from the registry, and every registrant
  re-checks after writing that ``challenger`` names the highest completed version (so the alias ends on
  the newest model whatever the interleaving).
- :func:`promote` moves ``champion`` to the challenger only when its mAP beats the champion's by
  ``min_gain`` (absolute) and its latency is at most ``1 + max_latency_regression`` times the
  champion's; the first model becomes champion only if its mAP is above ``first_champion_min_map`` (an
  absolute floor, default 0: a model that detects nothing is never the first champion). The decision
  and its reasons are recorded as tags on the challenger version (``promotion.*``) and on the
  registered model (``promotion.last``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from retinaflow.mlops.errors import MlopsError, RegistryError
from retinaflow.mlops.redact import one_line, redact_mapping
from retinaflow.mlops.runs import connect, ensure_experiment, unavailable
from retinaflow.mlops.settings import TrackingSettings

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
COMPLETE_TAG = "retinaflow.registered"
MODEL_DIR = "model"
_MAP_METRICS = ("final/mAP", "val/AP", "eval/AP")


@dataclass
class ModelFiles:
    """Files that make up a model version (any may be absent): checkpoint, ONNX, TensorRT engine."""

    checkpoint: str | Path | None = None
    onnx: str | Path | None = None
    engine: str | Path | None = None

    def present(self) -> list[Path]:
        """The files given, and a TensorRT engine's metadata (``<engine>.json``, which ``retinaflow infer
        model.plan`` reads; ``export.tensorrt.meta_path``) where it lies next to the engine."""
        paths = [Path(p) for p in (self.checkpoint, self.onnx, self.engine) if p]
        meta = Path(f"{self.engine}.json") if self.engine else None
        return paths + ([meta] if meta is not None and meta.is_file() else [])


@dataclass
class Decision:
    """Outcome of :func:`promote`."""

    model: str
    challenger: str
    champion_before: str | None
    promoted: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def champion_after(self) -> str | None:
        return self.challenger if self.promoted else self.champion_before

    def summary(self) -> str:
        verdict = "promoted" if self.promoted else "refused"
        return f"{self.model} v{self.challenger} {verdict}: " + "; ".join(self.reasons)


@dataclass
class VersionRow:
    """One line of :func:`list_versions`."""

    version: str
    aliases: list[str]
    map: float | None
    latency_ms: float | None
    precision: str | None
    backbone: str | None
    run_id: str | None
    created: float
    decision: str | None


def _client(settings: TrackingSettings | None) -> tuple[MlflowClient, str]:
    return connect(settings or TrackingSettings())


def _number(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _failure(exc: MlflowException, uri: str, action: str, missing: str) -> MlopsError:
    """The error to raise for an MLflow failure while trying to ``action``: :class:`RegistryError`
    (message ``missing``) when MLflow says something does not exist, else :class:`TrackingUnavailable`."""
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return RegistryError(missing)
    return unavailable(uri, action, exc)


def _versions(client: MlflowClient, name: str) -> Iterator[ModelVersion]:
    """Every version of ``name``, newest first (pages fetched as they are consumed)."""
    token = None
    while True:
        page = client.search_model_versions(
            f"name = '{name}'", max_results=200, order_by=["version_number DESC"], page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def _upload(client: MlflowClient, run_id: str, files: ModelFiles) -> None:
    for path in files.present():
        if not path.is_file():
            raise RegistryError(f"model file not found: {path}")
        client.log_artifact(run_id, str(path), MODEL_DIR)


def _evidence(
    client: MlflowClient, run_id: str, map_value: float | None, latency_ms: float | None
) -> dict[str, Any]:
    run = client.get_run(run_id)
    p, m = run.data.params, run.data.metrics
    if map_value is None:
        map_value = next((m[k] for k in _MAP_METRICS if k in m), None)
    latency_ms = latency_ms if latency_ms is not None else m.get("latency_ms")
    names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, MODEL_DIR)}
    if not names:
        raise RegistryError(
            f"run {run_id} has no {MODEL_DIR}/ artifacts: pass the checkpoint (and ONNX) to register"
        )
    deployable = any(n.endswith((".onnx", ".engine", ".plan")) for n in names)
    tags = {
        "map": map_value,
        "latency_ms": latency_ms,
        "precision": p.get("export.precision") if deployable else p.get("infer.precision"),
        "backbone": p.get("model.backbone"),
        "dataset_fingerprint": p.get("dataset.fingerprint"),
        "git_commit": p.get("git.commit") or run.data.tags.get("mlflow.source.git.commit"),
        "files": ",".join(sorted(names)),
    }
    return {k: v for k, v in tags.items() if v is not None}


def register_model(
    name: str,
    run_id: str | None = None,
    files: ModelFiles | None = None,
    map_value: float | None = None,
    latency_ms: float | None = None,
    tags: dict[str, Any] | None = None,
    settings: TrackingSettings | None = None,
) -> ModelVersion:
    """Register the ``model/`` artifacts of run ``run_id`` (uploading ``files`` there first) as a new
    version of ``name`` and point ``challenger`` at the newest registered version.

    Without ``run_id`` a run of kind ``register`` is created to hold ``files``. ``map_value`` defaults to
    the run's ``final/mAP`` / ``val/AP`` / ``eval/AP`` metric, ``latency_ms`` to its ``latency_ms``
    metric; backbone, precision, fingerprint and commit come from the run's params. ``tags`` add to
    (and override) these.
    """
    client, uri = _client(settings)
    files = files or ModelFiles()
    try:
        if run_id is None:
            if not files.present():
                raise RegistryError("nothing to register: give a run id or at least a checkpoint")
            exp = ensure_experiment(client, uri, (settings or TrackingSettings()).experiment)
            run_id = client.create_run(
                exp, run_name=f"register-{name}", tags={"retinaflow.kind": "register"}
            ).info.run_id
            _upload(client, run_id, files)
            client.set_terminated(run_id, "FINISHED")
        else:
            _upload(client, run_id, files)
        evidence = {**_evidence(client, run_id, map_value, latency_ms), **(tags or {}), COMPLETE_TAG: "true"}
        try:
            client.create_registered_model(name, description="RetinaNet detector registered by retinaflow")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(
            name, f"runs:/{run_id}/{MODEL_DIR}", run_id=run_id, tags=redact_mapping(evidence)
        )
        _converge_challenger(client, name)
        return client.get_model_version(name, mv.version)
    except MlflowException as exc:
        raise _failure(exc, uri, f"register {name}", f"cannot register {name}: {one_line(exc)}") from exc


def _newest_complete(client: MlflowClient, name: str) -> ModelVersion | None:
    return next((mv for mv in _versions(client, name) if mv.tags.get(COMPLETE_TAG) == "true"), None)


def _alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _converge_challenger(client: MlflowClient, name: str, attempts: int = 20) -> None:
    """Point ``challenger`` at the newest completed version, re-checking after each write: a racing
    registrant that wrote an older version after us sees the newer one on its own re-check."""
    for _ in range(attempts):
        newest = _newest_complete(client, name)
        if newest is None:
            return
        current = _alias_version(client, name, CHALLENGER)
        if current is not None and int(current.version) >= int(newest.version):
            return
        try:
            client.set_registered_model_alias(name, CHALLENGER, newest.version)
        except MlflowException as exc:
            # Two writers of one alias race in the server's delete-then-insert (sqlite: UNIQUE constraint
            # failed). The other writer won; re-check what the alias points at now.
            if "UNIQUE constraint" not in str(exc) and "IntegrityError" not in str(exc):
                raise
            time.sleep(random.uniform(0.05, 0.2))
    raise RegistryError(f"alias {CHALLENGER} of {name} kept changing under concurrent registrations; retry")


def decide(
    challenger: ModelVersion,
    champion: ModelVersion | None,
    min_gain: float,
    max_latency_regression: float,
    first_champion_min_map: float = 0.0,
) -> tuple[bool, list[str]]:
    """The gate itself, on the versions' tags (pure function of the evidence).

    Without a champion there is nothing to compare with: the challenger becomes the first champion
    when its mAP is strictly above the absolute floor ``first_champion_min_map``.
    """
    if champion is None:
        first_map = _number(challenger.tags.get("map"))
        if first_map is None:
            return False, ["no champion yet, and the challenger has no mAP to hold against the floor"]
        if first_map > first_champion_min_map:
            return True, [
                f"no champion yet: the first model becomes champion "
                f"(mAP {first_map:.4f} > floor {first_champion_min_map:.4f})"
            ]
        return False, [
            f"no champion yet, but mAP {first_map:.4f} <= floor {first_champion_min_map:.4f} "
            "(first_champion_min_map): not made champion"
        ]
    if str(champion.version) == str(challenger.version):
        return False, [f"version {challenger.version} is already the champion"]
    reasons, ok = [], True
    new_map, old_map = _number(challenger.tags.get("map")), _number(champion.tags.get("map"))
    if new_map is None or old_map is None:
        ok = False
        reasons.append(f"mAP missing on {'challenger' if new_map is None else 'champion'}: cannot compare")
    else:
        gain = new_map - old_map
        passed = gain >= min_gain - 1e-12
        ok &= passed
        reasons.append(
            f"mAP {new_map:.4f} vs {old_map:.4f}: gain {gain:+.4f} {'>=' if passed else '<'} {min_gain:.4f}"
        )
    new_lat, old_lat = _number(challenger.tags.get("latency_ms")), _number(champion.tags.get("latency_ms"))
    if old_lat is None:
        reasons.append("latency not measured on the champion: latency check skipped")
    elif new_lat is None:
        ok = False
        reasons.append(f"latency not measured on the challenger (champion: {old_lat:.2f} ms)")
    else:
        change = new_lat / old_lat - 1.0
        passed = change <= max_latency_regression + 1e-12
        ok &= passed
        reasons.append(
            f"latency {new_lat:.2f} ms vs {old_lat:.2f} ms: {change:+.1%} {'<=' if passed else '>'} "
            f"+{max_latency_regression:.1%}"
        )
    return ok, reasons


def promote(
    name: str,
    min_gain: float = 0.005,
    max_latency_regression: float = 0.1,
    settings: TrackingSettings | None = None,
    first_champion_min_map: float = 0.0,
) -> Decision:
    """Apply the promotion gate to ``name``'s challenger (see module doc); returns the :class:`Decision`."""
    if min_gain < 0 or max_latency_regression < 0 or first_champion_min_map < 0:
        raise RegistryError("--min-gain, --max-latency-regression and --first-champion-min-map must be >= 0")
    client, uri = _client(settings)
    try:
        client.get_registered_model(name)
        challenger = _alias_version(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"registered model {name} has no {CHALLENGER} version: register one first")
        champion = _alias_version(client, name, CHAMPION)
        promoted, reasons = decide(
            challenger, champion, min_gain, max_latency_regression, first_champion_min_map
        )
        before = str(champion.version) if champion else None
        decision = Decision(name, str(challenger.version), before, promoted, reasons)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
        record = {
            "promotion.decision": "promoted" if promoted else "refused",
            "promotion.reasons": "; ".join(reasons),
            "promotion.against": decision.champion_before or "none",
            "promotion.min_gain": min_gain,
            "promotion.max_latency_regression": max_latency_regression,
            "promotion.first_champion_min_map": first_champion_min_map,
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for key, value in redact_mapping(record).items():
            client.set_model_version_tag(name, challenger.version, key, value)
        client.set_registered_model_tag(name, "promotion.last", decision.summary()[:5000])
    except MlflowException as exc:
        raise _failure(exc, uri, f"promote {name}", f"no registered model named {name}") from exc
    (log.info if promoted else log.warning)("%s", decision.summary())
    return decision


def list_versions(name: str, settings: TrackingSettings | None = None) -> list[VersionRow]:
    """Every version of ``name`` (newest first) with its aliases and evidence tags."""
    client, uri = _client(settings)
    try:
        aliases: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        return [
            VersionRow(
                version=str(mv.version),
                aliases=sorted(aliases.get(str(mv.version), [])),
                map=_number(mv.tags.get("map")),
                latency_ms=_number(mv.tags.get("latency_ms")),
                precision=mv.tags.get("precision"),
                backbone=mv.tags.get("backbone"),
                run_id=mv.run_id,
                created=mv.creation_timestamp / 1000.0,
                decision=mv.tags.get("promotion.decision"),
            )
            for mv in _versions(client, name)
        ]
    except MlflowException as exc:
        raise _failure(exc, uri, f"list {name}", f"no registered model named {name}") from exc


def fetch(name: str, alias: str, destination: str | Path, settings: TrackingSettings | None = None) -> Path:
    """Download the files of ``name@alias`` (e.g. the champion) into ``destination``; returns the folder
    holding them (checkpoint, ONNX, engine)."""
    client, _ = _client(settings)
    mv = _alias_version(client, name, alias)
    if mv is None or not mv.run_id:
        raise RegistryError(f"{name} has no version with the alias {alias}")
    Path(destination).mkdir(parents=True, exist_ok=True)
    try:
        out = client.download_artifacts(mv.run_id, MODEL_DIR, str(destination))
    except MlflowException as exc:
        raise RegistryError(f"cannot fetch {name}@{alias}: {one_line(exc)}") from exc
    return Path(out)
