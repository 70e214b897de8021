"""A small kustomize renderer for this repository's own overlays (no network, no binary needed).

It supports what manifests/ uses: ``resources`` (files and folders with a kustomization),
``components``, ``namespace``, ``labels[].pairs`` and ``patches`` (strategic merge by path + target
kind: mappings merge, lists of named mappings merge by ``name``, other lists are replaced).
Remote resources (URLs) are reported, not fetched.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(folder: Path, remote: list[str] | None = None) -> list[dict[str, Any]]:
    """Objects of the kustomization in ``folder``; URLs of remote resources are appended to ``remote``."""
    spec = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        if "://" in entry:
            if remote is not None:
                remote.append(entry)
            continue
        target = (folder / entry).resolve()
        objects.extend(render(target, remote) if target.is_dir() else load_docs(target))
    for entry in spec.get("components", []):
        objects = _apply_patches((folder / entry).resolve(), objects)
    objects = _apply_patches(folder, objects)
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if spec.get("namespace"):
            meta["namespace"] = spec["namespace"]
        for group in spec.get("labels", []):
            meta.setdefault("labels", {}).update(group.get("pairs", {}))
    return objects


def _apply_patches(folder: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    for patch in spec.get("patches", []):
        body = load_docs(folder / patch["path"])[0]
        kind = patch.get("target", {}).get("kind", body.get("kind"))
        objects = [merge(o, _strip_identity(body)) if o.get("kind") == kind else o for o in objects]
    return objects


def _strip_identity(patch: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(patch)
    for key in ("apiVersion", "kind", "metadata"):
        body.pop(key, None)
    return body


def merge(base: Any, patch: Any) -> Any:
    """Strategic-merge subset: see the module doc."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        merged = {x["name"]: x for x in base}
        for item in patch:
            merged[item["name"]] = merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return copy.deepcopy(patch)
