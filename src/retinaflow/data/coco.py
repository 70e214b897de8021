"""COCO instances dataset with bad-entry accounting.

Loading validates the annotation file once and keeps only what training can use; every dropped entry
is counted by kind (see :meth:`CocoDataset.report`). Annotations are held as flat numpy arrays rather than
per-image Python lists, so DataLoader workers forked from the main process share them without copying.

Images that turn out corrupt while loading are skipped with a warning. Because that happens inside
worker processes, the skipped COCO ids ride along in :attr:`Sample.skipped` → ``Batch.skipped``, and the
loaders report them back with :meth:`CocoDataset.record_corrupt` in the main process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinaflow.data.annotations import (
    IMAGE_REFUSALS,
    check_annotation,
    check_folder,
    image_entry,
    is_int,
    is_number,
    listing,
    load_annotations,
)
from retinaflow.data.images import decode_file
from retinaflow.data.transforms import clip_boxes
from retinaflow.errors import DataError

log = logging.getLogger(__name__)

# transform(image (3, H, W) uint8, boxes (N, 4) float32 x1y1x2y2, the sample's seed or None)
#   -> (image (3, H', W') uint8, boxes (N, 4) float32 in the new pixels, scale new/old)
Transform = Callable[[torch.Tensor, torch.Tensor, "int | None"], tuple[torch.Tensor, torch.Tensor, float]]

_COUNTS = (
    "images_listed",
    "images",
    "annotations_listed",
    "annotations",
    "categories",
    "invalid_images",
    *IMAGE_REFUSALS,
    "duplicate_images",
    "missing_files",
    "corrupt_images",
    "dropped_unknown_image",
    "dropped_missing_image",
    "dropped_unknown_category",
    "dropped_crowd",
    "dropped_malformed",
    "dropped_degenerate",
    "dropped_outside",
    "clipped",
    "images_without_annotations",
)


@dataclass
class Sample:
    """One dataset item.

    image:    (3, H, W) uint8 RGB after the transform, or None when the image was corrupt and not replaced.
    boxes:    (N, 4) float32, x1y1x2y2 in transformed-image pixels.
    labels:   (N,) int64, contiguous class index 0..C-1.
    image_id: COCO id of the image actually returned.
    scale:    transformed size / original size.
    skipped:  COCO ids of corrupt images passed over to produce this sample.
    pad_at_least: (H, W) its batch is padded to at least (a DDP global batch's largest image; else 0, 0).
    """

    image: torch.Tensor | None
    boxes: torch.Tensor
    labels: torch.Tensor
    image_id: int
    scale: float
    skipped: tuple[int, ...] = field(default_factory=tuple)
    pad_at_least: tuple[int, int] = (0, 0)


class CocoDataset(torch.utils.data.Dataset[Sample]):
    """Images folder + COCO instances JSON, validated and cleaned at construction.

    ``dataset[i]`` or ``dataset[(i, seed)]`` returns a :class:`Sample`; the seed drives the transform's
    random choices, so augmentation does not depend on which worker loads the sample.

    Args:
        images: folder the ``file_name`` entries are relative to.
        annotations: COCO instances JSON (``images``, ``annotations``, ``categories``).
        transform: see :data:`Transform`; None keeps the image as decoded.
        replace_corrupt: True (training) returns the next decodable image in place of a corrupt one, so
            batches keep their size; False (evaluation) returns ``Sample.image = None``.
        require_annotations: raise :class:`DataError` when no annotation survives cleaning.
        keep_json: keep the cleaned JSON entries for :meth:`cleaned_json` (validation tools; training
            leaves it off so that forked workers do not touch large Python object graphs).
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path,
        transform: Transform | None = None,
        replace_corrupt: bool = True,
        require_annotations: bool = True,
        keep_json: bool = False,
    ) -> None:
        self.images_dir = check_folder(images)
        self.annotations_path = Path(annotations)
        self.transform = transform
        self.replace_corrupt = replace_corrupt
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._corrupt: set[int] = set()
        self._size_warned: set[int] = set()
        data = load_annotations(self.annotations_path)
        self._json: dict[str, Any] | None = None
        self._parse(data, require_annotations, keep_json)

    # -- public metadata ---------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Category names by contiguous label 0..C-1 (categories sorted by COCO id)."""
        return list(self._class_names)

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each contiguous label (label → id), for writing COCO results."""
        return list(self._category_ids)

    @property
    def image_ids(self) -> list[int]:
        """COCO ids of the kept images, in dataset order."""
        return [int(i) for i in self._ids]

    def image_sizes(self) -> np.ndarray:
        """(N, 2) int64 (height, width) of every kept image as the COCO file lists it, in dataset order."""
        return np.ascontiguousarray(self._sizes[:, ::-1])

    @property
    def file_names(self) -> dict[int, str]:
        """``file_name`` of each kept image, by COCO id."""
        return {int(i): str(f) for i, f in zip(self._ids, self._files, strict=True)}

    def file_path(self, index: int) -> Path:
        return self.images_dir / str(self._files[index])

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Cleaned ground truth of image ``index``.

        Returns boxes (N, 4) float32 x1y1x2y2 in original pixels and labels (N,) int64 in 0..C-1.
        """
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return self._boxes[lo:hi], self._labels[lo:hi]

    def cleaned_json(self, exclude_ids: set[int] | frozenset[int] = frozenset()) -> dict[str, Any]:
        """The annotation file with only the kept entries (clipped boxes), less the images in
        ``exclude_ids`` and their annotations. Needs ``keep_json=True``."""
        if self._json is None:
            raise DataError("cleaned_json() needs the dataset built with keep_json=True")
        doc = dict(self._json)
        doc["images"] = [e for e in doc["images"] if e["id"] not in exclude_ids]
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in exclude_ids]
        return doc

    def report(self) -> dict[str, int]:
        """Counts of what was listed, kept and dropped (by kind); ``corrupt_images`` counts those found
        so far in this process or reported back by the loaders."""
        out = dict(self._counts)
        out["corrupt_images"] = len(self._corrupt)
        return out

    def json_size(self, index: int) -> tuple[int, int]:
        """(width, height) that the annotation file gives image ``index``."""
        w, h = self._sizes[index]
        return int(w), int(h)

    def _check_size(self, index: int, width: int, height: int) -> None:
        """Warn (once per image and process) when the decoded size is not the annotated one: the boxes
        may not fit the pixels (they are clipped to the image)."""
        json_w, json_h = self.json_size(index)
        image_id = int(self._ids[index])
        if (json_w, json_h) == (width, height) or image_id in self._size_warned:
            return
        self._size_warned.add(image_id)
        hint = (
            ": the transpose, as written by a tool that ignored the EXIF orientation; check its boxes"
            if (json_w, json_h) == (height, width)
            else ""
        )
        log.warning(
            "image %s (id %d) is %dx%d as displayed but %s says %dx%d%s",
            self.file_path(index),
            image_id,
            width,
            height,
            self.annotations_path.name,
            json_w,
            json_h,
            hint,
        )

    def is_corrupt(self, image_id: int) -> bool:
        """Whether image ``image_id`` was found corrupt (by a loader of this process or its workers)."""
        return image_id in self._corrupt

    def record_corrupt(self, image_ids: tuple[int, ...] | list[int]) -> list[int]:
        """Note corrupt images found (possibly in a worker); returns the ids not known before."""
        new = [int(i) for i in image_ids if int(i) not in self._corrupt]
        self._corrupt.update(new)
        return new

    # -- loading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def decode(self, index: int) -> torch.Tensor | None:
        """Image ``index`` as (3, H, W) uint8 RGB as displayed (see :mod:`retinaflow.data.images`), or
        None (logged once) when it cannot be decoded."""
        path = self.file_path(index)
        try:
            return decode_file(path)
        except Exception as exc:  # PIL raises many types for bad files; all mean "unreadable"
            image_id = int(self._ids[index])
            if self.record_corrupt([image_id]):
                reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                log.warning("skipping corrupt image %s (id %d): %s", path, image_id, reason)
            return None

    def __getitem__(self, key: int | tuple[int, ...]) -> Sample:
        """``key``: an index, (index, augmentation seed), or (index, seed, H, W) with the size the sample's
        batch must be padded to at least (``sampler.TrainBatchSampler``'s DDP hint)."""
        index, seed = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
        pad_at_least = (key[2], key[3]) if isinstance(key, tuple) and len(key) == 4 else (0, 0)
        skipped: list[int] = []
        image = None
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            image = self.decode(i)
            if image is not None:
                index = i
                break
            skipped.append(int(self._ids[i]))
            if not self.replace_corrupt:
                empty = torch.zeros((0, 4), dtype=torch.float32)
                return Sample(None, empty, torch.zeros(0, dtype=torch.int64), skipped[0], 1.0, tuple(skipped))
        if image is None:
            raise DataError(f"none of the {len(self)} images in {self.images_dir} could be decoded")
        np_boxes, np_labels = self.targets(index)
        h, w = image.shape[-2:]
        self._check_size(index, int(w), int(h))
        boxes = clip_boxes(torch.from_numpy(np_boxes), int(h), int(w))  # in case a JSON width/height is off
        scale = 1.0
        if self.transform is not None:
            image, boxes, scale = self.transform(image, boxes, seed)
        labels = torch.from_numpy(np_labels.astype(np.int64))
        return Sample(image, boxes, labels, int(self._ids[index]), scale, tuple(skipped), pad_at_least)

    # -- validation --------------------------------------------------------------------------
    def _parse(self, data: dict[str, Any], require_annotations: bool, keep_json: bool) -> None:
        """Keep the usable images and annotations of ``data`` (COCO JSON), counting what is dropped and why.

        The kept entries are stored as flat arrays (``_ids``, ``_files``, ``_sizes``, ``_offsets`` into
        ``_boxes``/``_labels``) so that workers share them instead of copying Python objects.
        """
        cat_to_label = self._parse_categories(data["categories"])
        entries, missing = self._parse_images(data["images"])
        sizes = {i: (e["width"], e["height"]) for i, e in entries.items()}
        per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in entries}
        kept_anns = self._parse_annotations(
            data["annotations"], sizes, missing, cat_to_label, per_image, keep_json
        )
        if require_annotations and not kept_anns:
            dropped = {k: v for k, v in self._counts.items() if k.startswith("dropped_") and v}
            raise DataError(
                f"no usable annotations in {self.annotations_path} after cleaning "
                f"(dropped: {dropped or 'none listed'})"
            )
        self._store(entries, per_image)
        if keep_json:
            self._json = {**data, "images": list(entries.values()), "annotations": kept_anns}
        self._warn_dropped()

    def _parse_images(self, images: list[Any]) -> tuple[dict[int, dict[str, Any]], set[int]]:
        """The usable image entries by id, in file order (width/height normalised), and the ids whose
        file is missing (their annotations are dropped as such)."""
        c, on_disk = self._counts, listing(self.images_dir)
        entries: dict[int, dict[str, Any]] = {}
        missing: set[int] = set()
        c["images_listed"] = len(images)
        for entry in images:
            parsed = image_entry(entry)
            if isinstance(parsed, str):
                c["invalid_images"] += 1
                c[parsed] += 1
                continue
            image_id, name, w, h = parsed
            if image_id in entries or image_id in missing:
                c["duplicate_images"] += 1
            elif name in on_disk or ("/" in name and (self.images_dir / name).is_file()):
                entries[image_id] = {**entry, "width": w, "height": h}
            else:
                c["missing_files"] += 1
                missing.add(image_id)
        if not entries:
            raise DataError(
                f"no usable images: {self.annotations_path} lists {c['images_listed']}, {c['missing_files']} "
                f"missing in {self.images_dir}, {c['invalid_images']} invalid{self._refusals()}"
            )
        return entries, missing

    def _parse_annotations(
        self,
        annotations: list[Any],
        sizes: dict[int, tuple[int, int]],
        missing: set[int],
        cat_to_label: dict[int, int],
        per_image: dict[int, list[tuple[list[float], int]]],
        keep_json: bool,
    ) -> list[dict[str, Any]]:
        """Append each usable box (clipped to its image) to ``per_image``; return the kept annotations
        (with clipped ``bbox``/``area`` where ``keep_json``, so evaluation sees the same boxes)."""
        c = self._counts
        kept: list[dict[str, Any]] = []
        c["annotations_listed"] = len(annotations)
        for ann in annotations:
            kind, box = check_annotation(ann, sizes, missing, cat_to_label)
            if kind is not None:
                c[kind] += 1
                continue
            assert box is not None
            x1, y1, x2, y2, clipped = box
            c["clipped"] += clipped
            per_image[ann["image_id"]].append(([x1, y1, x2, y2], cat_to_label[ann["category_id"]]))
            if keep_json and clipped:
                area, box_area = ann.get("area"), (x2 - x1) * (y2 - y1)
                ann = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1]}
                ann["area"] = min(float(area), box_area) if is_number(area) else box_area
            kept.append(ann)
        c["annotations"] = len(kept)
        return kept

    def _store(self, entries: dict[int, dict[str, Any]], per_image: dict[int, list[Any]]) -> None:
        """Flatten the kept images and boxes into numpy arrays (image order: the file's)."""
        order = list(entries)
        counts = [len(per_image[i]) for i in order]
        self._ids = np.asarray(order, dtype=np.int64)
        self._files = np.asarray([entries[i]["file_name"] for i in order], dtype=np.str_)
        sizes = [(entries[i]["width"], entries[i]["height"]) for i in order]
        self._sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = [t for i in order for t in per_image[i]]
        self._boxes = np.asarray([b for b, _ in flat], dtype=np.float32).reshape(-1, 4)
        self._labels = np.asarray([lab for _, lab in flat], dtype=np.int64)
        self._counts["images"] = len(order)
        self._counts["images_without_annotations"] = sum(1 for n in counts if n == 0)

    def _warn_dropped(self) -> None:
        c = self._counts
        dropped_total = sum(v for k, v in c.items() if k.startswith("dropped_"))
        if dropped_total or c["missing_files"] or c["invalid_images"] or c["duplicate_images"]:
            items = ", ".join(f"{k} {v}" for k, v in c.items() if v and k not in _KEPT)
            log.warning("%s: %s", self.annotations_path, items)

    def _refusals(self) -> str:
        """`` (invalid_image_id 3: id is not an integer, ...)`` for the refused image entries, or ''."""
        found = [f"{k} {self._counts[k]}: {why}" for k, why in IMAGE_REFUSALS.items() if self._counts[k]]
        return f" ({', '.join(found)})" if found else ""

    def _parse_categories(self, categories: list[Any]) -> dict[int, int]:
        by_id: dict[int, str] = {}
        for cat in categories:
            if not isinstance(cat, dict) or not is_int(cat.get("id")):
                raise DataError(f"{self.annotations_path}: category without an integer id: {str(cat)[:80]}")
            if cat["id"] in by_id:
                raise DataError(f"{self.annotations_path}: category id {cat['id']} listed twice")
            by_id[cat["id"]] = str(cat.get("name", cat["id"]))
        if not by_id:
            raise DataError(f"{self.annotations_path}: no categories listed")
        self._category_ids = sorted(by_id)
        self._class_names = [by_id[i] for i in self._category_ids]
        self._counts["categories"] = len(by_id)
        return {cat_id: label for label, cat_id in enumerate(self._category_ids)}


_KEPT = {
    "images_listed",
    "images",
    "annotations_listed",
    "annotations",
    "categories",
    "images_without_annotations",
}
