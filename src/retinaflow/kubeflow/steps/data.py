"""The data_prep step and the dataset manifest that every later step reads.

A Dataset artifact is a folder::

    dataset.json        the manifest (DatasetManifest): where the split's images and annotations are,
                        the fingerprint, counts and class names
    train.json val.json the cleaned COCO annotations (bad entries dropped)
    report.json         what validation found and dropped

Images are not copied into the artifact: they stay where they were (local folder or ``s3://``),
or, with ``stage_uri``, are uploaded once under ``{stage_uri}/{fingerprint}/`` (content-addressed:
an already staged fingerprint is not uploaded again) and the manifest points there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retinaflow.errors import DataError
from retinaflow.kubeflow.steps.common import is_remote, local_input, remote_exists, reports_failure, upload

log = logging.getLogger(__name__)

MANIFEST_FILE = "dataset.json"
#: Image entries ``retinaflow.data.coco`` drops whose report keys do not start with ``dropped``/``corrupt``
#: (those are the dropped annotations and the undecodable images).
DROPPED_IMAGE_KINDS = ("invalid_images", "duplicate_images", "missing_files")


@dataclass
class DataPrepRequest:
    """The data_prep component's parameters.

    ``classes``: the category names the dataset must have, in order (empty: whatever it has).
    Without ``val_annotations``, ``val_fraction`` of the images (after cleaning) become the
    validation split, chosen with ``seed``.
    """

    images: str
    annotations: str
    val_images: str = ""
    val_annotations: str = ""
    val_fraction: float = 0.1
    seed: int = 0
    classes: list[str] = field(default_factory=list)
    stage_uri: str = ""


@dataclass
class DatasetManifest:
    """Where a prepared dataset is: local paths, ``s3://`` URIs, or names relative to the artifact folder."""

    train_images: str
    train_annotations: str
    val_images: str
    val_annotations: str
    fingerprint: str
    num_train: int
    num_val: int
    class_names: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    staged_uri: str = ""

    def metadata(self) -> dict[str, Any]:
        """What the KFP Dataset artifact shows in the UI."""
        return {
            "fingerprint": self.fingerprint,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "classes": ",".join(self.class_names),
            "dropped": sum(self.dropped.values()),
            "staged_uri": self.staged_uri,
        }

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def load_manifest(dataset_dir: str | Path) -> DatasetManifest:
    """Read the manifest of a Dataset artifact folder; relative entries resolve against the folder.

    (The folder's absolute path differs between pods and between machines, so the cleaned
    annotations inside it are recorded by name.)
    """
    folder = Path(dataset_dir)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{dataset_dir} is not a prepared dataset (no {MANIFEST_FILE}); run data_prep first")
    try:
        manifest = DatasetManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"dataset manifest {path} is malformed: {exc}") from exc
    for name in ("train_images", "train_annotations", "val_images", "val_annotations"):
        value = getattr(manifest, name)
        if not is_remote(value) and not Path(value).is_absolute():
            setattr(manifest, name, str(folder / value))
    return manifest


@reports_failure("data-prep")
def prepare_dataset(req: DataPrepRequest, out_dir: str | Path) -> DatasetManifest:
    """Validate (``retinaflow.data.validate``), split if needed, fingerprint, stage; write the artifact."""
    from retinaflow.data.validate import split_dataset, validate_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, Any] = {}
    images, annotations = local_input(req.images), local_input(req.annotations)
    if req.val_annotations:
        val_images = req.val_images or req.images
        reports["train"] = validate_dataset(images, annotations, out / "train.json")
        val_annotations = local_input(req.val_annotations)
        reports["val"] = validate_dataset(local_input(val_images), val_annotations, out / "val.json")
        digest = hashlib.sha256(f"{reports['train']['fingerprint']}:{reports['val']['fingerprint']}".encode())
        fingerprint = digest.hexdigest()
    else:
        val_images = req.images
        reports["all"] = validate_dataset(images, annotations, out / "all.json")
        train_json, val_json = out / "train.json", out / "val.json"
        reports["split"] = split_dataset(out / "all.json", req.val_fraction, req.seed, train_json, val_json)
        (out / "all.json").unlink()
        fingerprint = reports["all"]["fingerprint"]
    class_names = list(reports.get("train", reports.get("all", {}))["class_names"])
    _check_classes(req.classes, class_names, reports.get("val", {}).get("class_names"))
    (out / "report.json").write_text(json.dumps(reports, indent=2, default=str))
    manifest = DatasetManifest(
        train_images=req.images,
        train_annotations="train.json",
        val_images=val_images,
        val_annotations="val.json",
        fingerprint=fingerprint,
        num_train=_count_images(out / "train.json"),
        num_val=_count_images(out / "val.json"),
        class_names=class_names,
        dropped=_dropped(reports),
    )
    if req.stage_uri:
        _stage(manifest, out, req.stage_uri)
    manifest.save(out)
    log.info("dataset %s: %d train / %d val images, %d entries dropped", fingerprint[:12], manifest.num_train,
             manifest.num_val, sum(manifest.dropped.values()))  # fmt: skip
    return manifest


def _check_classes(expected: list[str], train: list[str], val: list[str] | None) -> None:
    if val is not None and val != train:
        raise DataError(f"train and val categories differ: {train} vs {val}")
    if expected and list(expected) != train:
        raise DataError(f"the dataset's classes {train} are not the expected {list(expected)}")


def _count_images(annotations: Path) -> int:
    return len(json.loads(annotations.read_text())["images"])


def _is_dropped(key: str) -> bool:
    return key.startswith(("dropped", "corrupt")) or key in DROPPED_IMAGE_KINDS


def _dropped(reports: dict[str, Any]) -> dict[str, int]:
    """Every dropped kind of the validation reports (:func:`_is_dropped`), summed over the files."""
    totals: dict[str, int] = {}
    for report in reports.values():
        for key, value in report.items():
            if _is_dropped(key) and isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals


def _stage(manifest: DatasetManifest, folder: Path, stage_uri: str) -> None:
    """Upload images and cleaned annotations under ``{stage_uri}/{fingerprint}/``; point the manifest there.

    The staged ``dataset.json`` is uploaded last, so its presence means a complete copy: a later
    run with the same fingerprint reuses it without uploading again.
    """
    dest = f"{stage_uri.rstrip('/')}/{manifest.fingerprint}"
    separate_val = manifest.val_images != manifest.train_images
    marker = f"{dest}/{MANIFEST_FILE}"
    already = remote_exists(marker)
    if not already:
        upload(local_input(manifest.train_images), f"{dest}/images")
        if separate_val:
            upload(local_input(manifest.val_images), f"{dest}/val_images")
        for name in ("train.json", "val.json", "report.json"):
            upload(folder / name, f"{dest}/{name}")
    manifest.train_images = f"{dest}/images"
    manifest.val_images = f"{dest}/val_images" if separate_val else manifest.train_images
    manifest.train_annotations, manifest.val_annotations = f"{dest}/train.json", f"{dest}/val.json"
    manifest.staged_uri = dest
    if already:
        log.info("dataset %s already staged at %s", manifest.fingerprint[:12], dest)
    else:
        upload(manifest.save(folder), marker)
