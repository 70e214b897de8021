"""data_prep's step: validation, split, fingerprint, staging, and the manifest later steps read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retinaflow.errors import DataError
from retinaflow.kubeflow.steps import data as data_step
from retinaflow.kubeflow.steps.data import DataPrepRequest, load_manifest, prepare_dataset


def _count(path: str) -> int:
    return len(json.loads(Path(path).read_text())["images"])


def test_split_when_no_validation_set(synth_small, tmp_path):
    req = DataPrepRequest(
        str(synth_small.train_images), str(synth_small.train_annotations), val_fraction=0.25
    )
    manifest = prepare_dataset(req, tmp_path / "ds")
    total = _count(synth_small.train_annotations)
    assert manifest.num_train + manifest.num_val == total and manifest.num_val == round(total * 0.25)
    loaded = load_manifest(tmp_path / "ds")
    assert Path(loaded.train_annotations) == tmp_path / "ds" / "train.json"  # stored relative, read absolute
    assert _count(loaded.val_annotations) == manifest.num_val
    assert loaded.val_images == loaded.train_images == str(synth_small.train_images)
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["train_annotations"] == "train.json"
    again = prepare_dataset(req, tmp_path / "ds2")
    assert again.fingerprint == manifest.fingerprint and len(manifest.fingerprint) == 64
    assert json.loads((tmp_path / "ds2/val.json").read_text()) == json.loads(
        (tmp_path / "ds/val.json").read_text()
    )


def test_separate_validation_set_and_dropped_entries(synth_small, tmp_path):
    doc = json.loads(Path(synth_small.train_annotations).read_text())
    doc["annotations"].append({**doc["annotations"][0], "id": 10**6, "image_id": 10**6})  # unknown image
    bad = tmp_path / "train_bad.json"
    bad.write_text(json.dumps(doc))
    req = DataPrepRequest(
        str(synth_small.train_images), str(bad), str(synth_small.val_images), str(synth_small.val_annotations)
    )
    manifest = prepare_dataset(req, tmp_path / "ds")
    assert manifest.val_images == str(synth_small.val_images)
    assert manifest.num_val == _count(synth_small.val_annotations)
    assert manifest.dropped.get("dropped_unknown_image") == 1
    assert manifest.class_names == ["circle", "square", "triangle", "star", "cross", "ring"]
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert set(report) == {"train", "val"}


def test_dropped_totals_count_every_kind(synth_small, tmp_path):
    """Image entries dropped by CocoDataset (missing file, invalid, duplicate) count as dropped."""
    doc = json.loads(Path(synth_small.train_annotations).read_text())
    first = doc["images"][0]
    doc["images"] += [
        {**first, "id": 10**6, "file_name": "not_there.png"},  # missing_files
        {"id": 10**6 + 1, "file_name": first["file_name"], "width": 0, "height": 8},  # invalid_images
        dict(first),  # duplicate_images
    ]
    doc["annotations"].append({**doc["annotations"][0], "id": 10**6, "image_id": 10**7})  # unknown image
    bad = tmp_path / "train_bad.json"
    bad.write_text(json.dumps(doc))
    req = DataPrepRequest(
        str(synth_small.train_images), str(bad), str(synth_small.val_images), str(synth_small.val_annotations)
    )
    manifest = prepare_dataset(req, tmp_path / "ds")
    kinds = ("missing_files", "invalid_images", "duplicate_images", "dropped_unknown_image")
    assert {k: manifest.dropped.get(k) for k in kinds} == dict.fromkeys(kinds, 1)
    assert manifest.metadata()["dropped"] == sum(manifest.dropped.values()) >= 4
    assert "images_listed" not in manifest.dropped and "clipped" not in manifest.dropped  # counts, not drops


def test_expected_classes_are_checked(synth_small, tmp_path):
    req = DataPrepRequest(str(synth_small.train_images), str(synth_small.train_annotations), classes=["cat"])
    with pytest.raises(DataError, match="not the expected"):
        prepare_dataset(req, tmp_path / "ds")


def test_missing_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_manifest(tmp_path)


def test_staging_uploads_once_per_fingerprint(synth_small, tmp_path, monkeypatch):
    bucket: dict[str, Path] = {}

    def upload(local: Path, uri: str) -> None:
        target = tmp_path / "bucket" / uri.removeprefix("s3://")
        if Path(local).is_dir():
            shutil.copytree(local, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
        bucket[uri] = target

    monkeypatch.setattr(data_step, "upload", upload)
    monkeypatch.setattr(data_step, "remote_exists", lambda uri: uri in bucket)
    req = DataPrepRequest(
        str(synth_small.train_images), str(synth_small.train_annotations), stage_uri="s3://b/ds/"
    )
    manifest = prepare_dataset(req, tmp_path / "ds")
    dest = f"s3://b/ds/{manifest.fingerprint}"
    assert list(bucket) == [
        f"{dest}/images",
        f"{dest}/train.json",
        f"{dest}/val.json",
        f"{dest}/report.json",
        f"{dest}/dataset.json",
    ]  # fmt: skip  (the marker last)
    assert manifest.train_images == manifest.val_images == f"{dest}/images"
    assert (manifest.train_annotations, manifest.staged_uri) == (f"{dest}/train.json", dest)
    assert sorted(p.name for p in bucket[f"{dest}/images"].iterdir()) == sorted(
        p.name for p in Path(synth_small.train_images).iterdir()
    )
    uploads = len(bucket)
    second = prepare_dataset(req, tmp_path / "ds2")
    assert len(bucket) == uploads and second.train_images == manifest.train_images
