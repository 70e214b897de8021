"""Pipeline arguments: ``--param key=value`` strings and config files turned into typed arguments.

The pipeline's interface (names, types, defaults) is read from the compiled component spec, so
the CLI can never drift from the DAG's signature.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import yaml

from retinaflow.config import Config
from retinaflow.errors import ConfigError

#: Pipeline parameters renamed to their config key's name: the old name still works, with a warning.
RENAMED = {"iterations": "iters"}
#: Config keys the pipeline sets itself (dataset paths from data_prep, eval size from resize/max_size).
_PIPELINE_OWNED = {
    *("data.images", "data.annotations", "data.val_images", "data.val_annotations"),
    *("class_names", "infer.resize", "infer.max_size"),
}


def pipeline_inputs() -> dict[str, Any]:
    """``{name: InputSpec}`` of the pipeline (types String, Integer, Float, Boolean, List[...])."""
    from retinaflow.kubeflow.pipeline import retinaflow_pipeline

    return dict(retinaflow_pipeline.component_spec.inputs or {})


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["iters=500", "classes=[a, b]", ...]`` → typed arguments; unknown names are an error."""
    specs = pipeline_inputs()
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--param {item!r} must look like name=value")
        name, raw = (s.strip() for s in item.split("=", 1))
        if name in RENAMED:
            warnings.warn(f"pipeline parameter {name} is now {RENAMED[name]}", FutureWarning, stacklevel=2)
            name = RENAMED[name]
        if name not in specs:
            raise ConfigError(f"unknown pipeline parameter {name!r}; known: {', '.join(sorted(specs))}")
        out[name] = coerce(name, specs[name].type, raw)
    return out


def coerce(name: str, kind: str, raw: str) -> Any:
    """Parse ``raw`` as the KFP type ``kind``."""
    try:
        if kind == "Integer":
            return int(raw)
        if kind == "Float":
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"pipeline parameter {name} expects a {kind.lower()}, got {raw!r}") from exc
    if kind == "Boolean":
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"pipeline parameter {name} expects true/false, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    if kind.startswith("List"):
        value = (
            yaml.safe_load(raw)
            if raw.strip().startswith("[")
            else [v.strip() for v in raw.split(",") if v.strip()]
        )
        if not isinstance(value, list):
            raise ConfigError(f"pipeline parameter {name} expects a list, got {raw!r}")
        return [str(v) for v in value]
    return raw


def check_required(arguments: dict[str, Any]) -> None:
    missing = [n for n, s in pipeline_inputs().items() if not s.optional and n not in arguments]
    if missing:
        raise ConfigError(f"missing pipeline parameter(s): {', '.join(missing)} (pass --param name=value)")


def check_arguments(arguments: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for arguments a step would refuse, before anything is launched: a
    configuration error inside a step would only be retried (the train task has a retry policy) and
    its cause buried in the step's log. Checks the train request (the config it implies, overrides
    included) and the split and node counts."""
    import dataclasses

    from retinaflow.kubeflow.steps.training import TrainRequest

    fields = {f.name for f in dataclasses.fields(TrainRequest)}
    TrainRequest(**{k: v for k, v in arguments.items() if k in fields}).check()
    if not 0 < float(arguments.get("val_fraction", 0.1)) < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {arguments['val_fraction']}")
    if int(arguments.get("nodes", 1)) < 1:
        raise ConfigError(f"nodes must be at least 1, got {arguments['nodes']}")


def config_arguments(config: Config) -> dict[str, Any]:
    """Pipeline arguments reproducing ``config``: its dedicated parameters, the rest as ``overrides``.

    Only values that differ from the defaults are carried; dataset paths are the pipeline's own.
    """
    from retinaflow.kubeflow.steps.training import CONFIG_FLAGS

    params = {f.key: f.name for f in CONFIG_FLAGS}
    flat, defaults = _flatten(config.to_dict()), _flatten(Config().to_dict())
    args: dict[str, Any] = {}
    overrides = []
    for key, value in flat.items():
        if key in _PIPELINE_OWNED or value == defaults.get(key):
            continue
        if key in params:
            args[params[key]] = "" if value is None else value
        else:
            overrides.append(f"{key}={json.dumps(value)}")
    if overrides:
        args["overrides"] = overrides
    return args


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
