from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from retinaflow.config import DataConfig
from retinaflow.data.batch import Batch
from retinaflow.data.coco import Sample
from retinaflow.data.loader import build_eval_loader, build_train_loader, collate
from retinaflow.errors import ConfigError

from .conftest import truncate


def _cfg(images: Path, annotations: Path, workers: int = 0) -> DataConfig:
    return DataConfig(
        images=str(images),
        annotations=str(annotations),
        resize=48,
        max_size=96,
        jitter=(32, 64),
        pad_stride=32,
        workers=workers,
    )


def _take(loader, n: int) -> list[Batch]:
    return list(itertools.islice(loader, n))


def _sample(h: int, w: int, n: int, image_id: int, skipped: tuple[int, ...] = ()) -> Sample:
    image = torch.full((3, h, w), 7, dtype=torch.uint8)
    boxes = torch.arange(n * 4, dtype=torch.float32).view(n, 4) + 1
    return Sample(image, boxes, torch.arange(n), image_id, 0.5, skipped)


# -- collate -------------------------------------------------------------------------------------
def test_collate_pads_images_boxes_and_labels() -> None:
    batch = collate([_sample(40, 70, 2, 11), _sample(65, 30, 0, 12), _sample(10, 10, 3, 13, (99,))], 32)
    assert batch.images.shape == (3, 3, 96, 96) and batch.images.dtype == torch.uint8
    assert batch.images[0, :, :40, :70].eq(7).all() and batch.images[0, :, 40:].eq(0).all()
    assert batch.images[0, :, :, 70:].eq(0).all() and batch.images[1, :, :65, :30].eq(7).all()
    assert batch.boxes.shape == (3, 3, 4) and batch.labels.shape == (3, 3)
    assert batch.labels.tolist() == [[0, 1, -1], [-1, -1, -1], [0, 1, 2]]
    assert batch.boxes[0, 2].eq(0).all() and batch.boxes[1].eq(0).all()
    torch.testing.assert_close(batch.boxes[2], torch.arange(12, dtype=torch.float32).view(3, 4) + 1)
    assert batch.sizes.tolist() == [[40, 70], [65, 30], [10, 10]]
    assert batch.image_ids.tolist() == [11, 12, 13] and batch.scales.tolist() == [0.5, 0.5, 0.5]
    assert batch.skipped == (99,)


def test_collate_without_boxes_or_images() -> None:
    batch = collate([_sample(32, 32, 0, 1)], 32)
    assert batch.boxes.shape == (1, 1, 4) and batch.labels.tolist() == [[-1]]
    empty = Sample(None, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 5, 1.0, (5,))
    batch = collate([empty, _sample(20, 20, 1, 6)], 32)
    assert len(batch) == 1 and batch.image_ids.tolist() == [6] and batch.skipped == (5,)
    batch = collate([empty], 32)
    assert len(batch) == 0 and batch.skipped == (5,)


def test_batch_to_keeps_skipped_ids() -> None:
    batch = collate([_sample(20, 20, 1, 6, (3, 4))], 32)
    moved = batch.to("cpu")
    assert moved.skipped == (3, 4) and torch.equal(moved.images, batch.images)


# -- training stream -----------------------------------------------------------------------------
def test_ranks_see_disjoint_samples_covering_each_epoch(make_coco) -> None:
    images, annotations = make_coco(8)
    cfg = dataclasses.replace(_cfg(images, annotations), bucket_levels=1)  # one group: epochs stay whole
    per_rank = []
    for rank in (0, 1):
        loader, _ = build_train_loader(cfg, batch=2, seed=0, rank=rank, world_size=2)
        epochs = [[i for b in _take(loader, 2) for i in b.image_ids.tolist()] for _ in range(2)]
        assert loader.epoch == 2
        per_rank.append(epochs)
    for epoch in (0, 1):
        a, b = per_rank[0][epoch], per_rank[1][epoch]
        assert set(a).isdisjoint(b) and sorted(a + b) == list(range(1, 9))
    assert per_rank[0][0] + per_rank[1][0] != per_rank[0][1] + per_rank[1][1]  # reshuffled per epoch


def test_same_seed_same_batches_different_seed_differs(make_coco) -> None:
    images, annotations = make_coco(6, size=(50, 40))
    cfg = _cfg(images, annotations)
    a = _take(build_train_loader(cfg, 2, seed=1)[0], 4)
    b = _take(build_train_loader(cfg, 2, seed=1)[0], 4)
    c = _take(build_train_loader(cfg, 2, seed=2)[0], 4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.boxes, y.boxes)
        assert torch.equal(x.image_ids, y.image_ids) and torch.equal(x.scales, y.scales)
    assert [x.image_ids.tolist() for x in a] != [x.image_ids.tolist() for x in c]
    shapes = {tuple(x.sizes[0].tolist()) for x in a + c}
    assert len(shapes) > 1  # multi-scale training


def test_resume_sees_the_data_an_uninterrupted_run_would(make_coco) -> None:
    images, annotations = make_coco(7, size=(50, 40), per_image=2)
    full = _take(build_train_loader(_cfg(images, annotations, workers=0), 3, seed=4)[0], 8)
    resumed_loader, _ = build_train_loader(_cfg(images, annotations, workers=2), 3, seed=4, start_iteration=5)
    resumed = _take(resumed_loader, 3)
    assert resumed_loader.iteration == 8
    for x, y in zip(full[5:], resumed, strict=True):
        assert torch.equal(x.image_ids, y.image_ids)
        assert torch.equal(x.images, y.images)  # same augmentation, whatever the worker count
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.labels, y.labels)


def test_train_batches_have_padded_shapes_and_consistent_targets(make_coco) -> None:
    images, annotations = make_coco(4, size=(50, 40), per_image=3)
    loader, dataset = build_train_loader(_cfg(images, annotations), 2, seed=0)
    assert dataset.class_names == ["a", "b"] and dataset.category_ids == [1, 2]
    for batch in _take(loader, 4):
        assert batch.images.shape[-2] % 32 == 0 and batch.images.shape[-1] % 32 == 0
        assert batch.labels.shape == (2, 3) and (batch.labels >= 0).all()
        h, w = batch.sizes[:, 0:1].float(), batch.sizes[:, 1:2].float()
        assert (batch.boxes[..., 2] <= w).all() and (batch.boxes[..., 3] <= h).all()
        torch.testing.assert_close(batch.sizes[:, 0].float(), 40 * batch.scales, atol=0.6, rtol=0)


def test_corrupt_images_skipped_and_counted_through_workers(make_coco) -> None:
    images, annotations = make_coco(8)
    truncate(images / "000003.jpg")
    (images / "000006.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    loader, dataset = build_train_loader(_cfg(images, annotations, workers=2), 2, seed=0)
    assert dataset.report()["corrupt_images"] == 0
    batches = _take(loader, 8)  # two epochs
    assert all(len(b) == 2 for b in batches)
    seen = {i for b in batches for i in b.image_ids.tolist()}
    assert seen.isdisjoint({3, 6}) and seen == {1, 2, 4, 5, 7, 8}
    assert sum(len(b.skipped) for b in batches) == 4  # each corrupt image, once per epoch
    assert loader.skipped_ids == {3, 6} and dataset.report()["corrupt_images"] == 2


# -- evaluation ----------------------------------------------------------------------------------
def test_eval_each_image_once_across_ranks(make_coco) -> None:
    images, annotations = make_coco(7, size=(60, 30))
    cfg = _cfg(images, annotations)
    ids = []
    for rank in (0, 1):
        loader, _ = build_eval_loader(images, annotations, cfg, batch=2, rank=rank, world_size=2)
        batches = list(loader)
        assert len(loader) == len(batches)
        for b in batches:
            assert b.sizes.tolist() == [[48, 96]] * len(b)
            torch.testing.assert_close(b.scales, torch.full((len(b),), 1.6))
            assert b.images.shape[-2:] == (64, 96)
        ids.append([i for b in batches for i in b.image_ids.tolist()])
    assert set(ids[0]).isdisjoint(ids[1]) and sorted(ids[0] + ids[1]) == list(range(1, 8))
    assert len(ids[0]) == 4 and len(ids[1]) == 3


def test_eval_skips_corrupt_images_through_workers(make_coco) -> None:
    images, annotations = make_coco(5)
    truncate(images / "000002.jpg", keep=0.4)
    cfg = _cfg(images, annotations, workers=2)
    loader, dataset = build_eval_loader(images, annotations, cfg, batch=1)
    batches = list(loader)
    assert [b.image_ids.tolist() for b in batches] == [[1], [3], [4], [5]]  # no empty batch
    assert loader.skipped_ids == {2} and dataset.report()["corrupt_images"] == 1
    assert list(itertools.chain(*(b.image_ids.tolist() for b in loader))) == [1, 3, 4, 5]  # re-iterable


def test_loader_argument_errors(make_coco) -> None:
    images, annotations = make_coco(2)
    cfg = _cfg(images, annotations)
    with pytest.raises(ConfigError, match="batch size"):
        build_train_loader(cfg, 0, seed=0)
    with pytest.raises(ConfigError, match="rank 2"):
        build_train_loader(cfg, 1, seed=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="start_iteration"):
        build_train_loader(cfg, 1, seed=0, start_iteration=-1)
    with pytest.raises(ConfigError, match=r"data\.images"):
        build_train_loader(DataConfig(), 1, seed=0)
    with pytest.raises(ConfigError, match="workers"):
        build_eval_loader(images, annotations, DataConfig(workers=-1), 1)


@pytest.mark.gpu
def test_pinned_batches_reach_the_gpu(make_coco) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    images, annotations = make_coco(4)
    loader, _ = build_train_loader(_cfg(images, annotations, workers=2), 2, seed=0, pin_memory=True)
    batch = next(loader)
    assert batch.images.is_pinned() and batch.boxes.is_pinned()
    moved = batch.to("cuda")
    assert moved.images.is_cuda and moved.labels.is_cuda and moved.skipped == batch.skipped
