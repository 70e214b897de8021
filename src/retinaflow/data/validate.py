"""Dataset checks for ``retinaflow data validate`` and the pipeline's data_prep step.

- :func:`validate_dataset`: clean a COCO dataset (the same rules as :class:`CocoDataset`, plus decoding
  every image to find corrupt ones), write the cleaned JSON, return a JSON-able report of every count.
- :func:`split_dataset`: a seeded train/val split of one annotation file.
- :func:`fingerprint`: a content hash of a dataset that is stable across machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from retinaflow.data.annotations import load_annotations
from retinaflow.data.coco import CocoDataset
from retinaflow.data.images import encoded_problem
from retinaflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def validate_dataset(
    images: str | Path, annotations: str | Path, out_annotations: str | Path, threads: int | None = None
) -> dict[str, Any]:
    """Check ``annotations`` against ``images``, write the cleaned file to ``out_annotations``.

    Dropped: invalid/duplicate image entries, images missing on disk or that fail to decode, and
    annotations with unknown images or categories, crowd flags, malformed, zero-area or fully outside
    boxes (partly outside boxes are clipped). Raises :class:`DataError` when nothing usable is left.

    Returns the counts of :meth:`CocoDataset.report` (``images``/``annotations`` = what was written),
    plus ``size_mismatch`` (decoded size, EXIF orientation applied, differs from the JSON), of which
    ``size_transposed`` (the JSON has height and width swapped: a tool that ignored the EXIF
    orientation, whose boxes are likely misplaced), ``dropped_corrupt_image``, ``dali_unreadable``
    (images that decode here but that the DALI loader would skip: GIF),
    ``class_names``, ``fingerprint`` (of the input) and ``out_annotations``.
    """
    dataset = CocoDataset(images, annotations, transform=None, replace_corrupt=False, keep_json=True)
    doc = dataset.cleaned_json()
    declared = {e["id"]: (e["height"], e["width"]) for e in doc["images"]}

    def check(index: int) -> tuple[tuple[int, int] | None, str | None]:
        """The decoded (h, w) (None: corrupt), and why the DALI loader would pass the file over."""
        image = dataset.decode(index)
        if image is None:
            return None, None
        problem = encoded_problem(dataset.file_path(index).read_bytes())
        return (int(image.shape[-2]), int(image.shape[-1])), problem

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        checked = list(pool.map(check, range(len(dataset))))
    shapes = [s for s, _ in checked]
    dali_unreadable = [(dataset.file_path(i).name, p) for i, (_, p) in enumerate(checked) if p is not None]
    if dali_unreadable:
        name, problem = dali_unreadable[0]
        log.warning(
            "%d image(s) decode here but the DALI loader would skip them (%s: %s); train on this dataset "
            "with --loader torch",
            len(dali_unreadable), name, problem,
        )  # fmt: skip
    ids = dataset.image_ids
    corrupt = {i for i, s in zip(ids, shapes, strict=True) if s is None}
    wrong = [(s, declared[i]) for i, s in zip(ids, shapes, strict=True) if s is not None and s != declared[i]]
    transposed = sum(1 for s, d in wrong if s[::-1] == d)

    cleaned = dataset.cleaned_json(exclude_ids=corrupt)
    if not cleaned["images"]:
        raise DataError(f"none of the {len(ids)} images of {annotations} could be decoded")
    if not cleaned["annotations"]:
        raise DataError(f"no usable annotations in {annotations}: all belong to corrupt images")
    _write_json(Path(out_annotations), cleaned)

    report: dict[str, Any] = dict(dataset.report())
    report.update(
        images=len(cleaned["images"]),
        annotations=len(cleaned["annotations"]),
        corrupt_images=len(corrupt),
        dropped_corrupt_image=len(doc["annotations"]) - len(cleaned["annotations"]),
        size_mismatch=len(wrong),
        size_transposed=transposed,
        dali_unreadable=len(dali_unreadable),
        class_names=dataset.class_names,
        fingerprint=fingerprint(images, annotations),
        out_annotations=str(out_annotations),
    )
    return report


def split_dataset(
    annotations: str | Path, val_fraction: float, seed: int, out_train: str | Path, out_val: str | Path
) -> dict[str, int]:
    """Split the images of ``annotations`` (with their annotations) at random into two COCO files.

    The validation share is ``round(n * val_fraction)``, at least 1 and at most n - 1; the same seed gives
    the same split. Entries keep their original order. Returns the image and annotation counts.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    data = load_annotations(Path(annotations))
    entries = data["images"]
    if len(entries) < 2:
        raise DataError(f"{annotations} lists {len(entries)} image(s); a split needs at least 2")
    n_val = min(max(1, round(len(entries) * val_fraction)), len(entries) - 1)
    chosen = np.random.default_rng(seed).permutation(len(entries))[:n_val]
    val_pos = set(chosen.tolist())
    parts: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for name, out, pick in (("train", out_train, False), ("val", out_val, True)):
        imgs = [e for k, e in enumerate(entries) if (k in val_pos) == pick]
        ids = {e.get("id") if isinstance(e, dict) else None for e in imgs}
        anns = [a for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") in ids]
        parts[name] = {**data, "images": imgs, "annotations": anns}
        counts[f"{name}_images"], counts[f"{name}_annotations"] = len(imgs), len(anns)
        _write_json(Path(out), parts[name])
    return counts


def fingerprint(images_dir: str | Path, annotations: str | Path) -> str:
    """sha256 (hex) of the annotation file's bytes and the sorted relative paths and byte sizes of the
    files under ``images_dir`` (hidden files ignored). Independent of timestamps, absolute paths and
    listing order, so the same dataset gives the same value on any machine."""
    root, ann = Path(images_dir), Path(annotations)
    if not root.is_dir():
        raise DataError(f"images folder not found: {root}")
    if not ann.is_file():
        raise DataError(f"annotation file not found: {ann}")
    digest = hashlib.sha256()
    digest.update(b"annotations\0")
    with ann.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(b"\0images\0")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path.stat().st_size))
    for rel, size in sorted(files):
        digest.update(f"{rel}\0{size}\n".encode())
    return digest.hexdigest()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a crashed step never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)
