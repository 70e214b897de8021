from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retinaflow.config import DataConfig
from retinaflow.data.loader import build_eval_loader, build_train_loader
from retinaflow.data.shapes import (
    ShapePolicy,
    aspect_groups,
    build_policy,
    shorter_levels,
    use_cudnn_benchmark,
)
from retinaflow.errors import ConfigError

from .conftest import CATEGORIES, ann, write_image

# (width, height) of a COCO-like spread: landscape, portrait, square, one wide panorama
SIZES = [(64, 48), (48, 64), (64, 43), (50, 38), (60, 60), (43, 64), (96, 40), (64, 48), (48, 64)]


def _mixed_coco(root: Path, n: int = 27) -> tuple[Path, Path]:
    images, entries = root / "images", []
    for i in range(1, n + 1):
        w, h = SIZES[i % len(SIZES)]
        write_image(images / f"{i:06d}.jpg", w, h, seed=i)
        entries.append({"id": i, "file_name": f"{i:06d}.jpg", "width": w, "height": h})
    anns = [ann(i, i, [2.0, 3.0, 20.0, 15.0], 1 + i % 2) for i in range(1, n + 1)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": CATEGORIES}))
    return images, path


def _cfg(images: Path, annotations: Path, **kw) -> DataConfig:
    base = dict(resize=48, max_size=96, jitter=(32, 64), pad_stride=32, workers=0, color_jitter=0.0)
    return DataConfig(images=str(images), annotations=str(annotations), **{**base, **kw})


def test_aspect_groups_split_portrait_and_landscape() -> None:
    hw = np.array([[48, 64], [64, 48], [60, 60], [40, 96], [100, 20]])
    assert aspect_groups(hw, 2).tolist() == [1, 0, 1, 1, 0]
    assert aspect_groups(hw, 1).tolist() == [0] * 5
    assert aspect_groups(hw, 4).tolist() == [2, 1, 2, 3, 0]  # edges 0.71, 1, 1.41


def test_shorter_levels_end_at_the_maximum() -> None:
    assert shorter_levels(640, 1024, 3) == [768, 896, 1024]
    assert shorter_levels(640, 1024, 1) == [1024]
    assert shorter_levels(800, 800, 4) == [800]


def test_policy_picks_the_smallest_fitting_bucket_and_falls_back_to_stride() -> None:
    policy = ShapePolicy(((64, 96), (96, 64), (96, 128)), 32)
    assert policy.pad_shape(50, 90) == (64, 96)
    assert policy.pad_shape(70, 60) == (96, 64)
    assert policy.pad_shape(70, 90) == (96, 128)
    assert policy.pad_shape(200, 10) == (224, 32)  # nothing fits: stride padding
    assert ShapePolicy((), 32).pad_shape(33, 1) == (64, 32) and not ShapePolicy((), 32).bounded


def test_buckets_hold_every_resized_image() -> None:
    hw = np.array([[480, 640], [640, 480], [427, 640], [375, 500], [768, 1024], [400, 1200]])
    data = DataConfig(max_size=1333)
    groups = aspect_groups(hw, 2)
    levels = shorter_levels(640, 1024, 3)
    policy = build_policy(data, hw, groups, levels, 128)
    assert len(policy.buckets) <= 2 * 3
    for (h, w), shorter in itertools.product(hw.tolist(), range(640, 1025, 7)):
        from retinaflow.data.shapes import _resized

        rh, rw = _resized(h, w, shorter, 1333)
        bh, bw = policy.pad_shape(rh, rw)
        assert (bh, bw) in policy.buckets and bh >= rh and bw >= rw


def test_cudnn_policy() -> None:
    bounded, unbounded = ShapePolicy(((32, 32),), 32), ShapePolicy((), 32)
    assert use_cudnn_benchmark("auto", bounded) and not use_cudnn_benchmark("auto", unbounded)
    assert use_cudnn_benchmark("on", unbounded) and not use_cudnn_benchmark("off", bounded)
    with pytest.raises(ConfigError):
        use_cudnn_benchmark("sometimes", bounded)
    with pytest.raises(ConfigError):
        build_policy(DataConfig(shapes="exact"), np.zeros((1, 2)), np.zeros(1), [1], 32)


def test_train_batches_are_one_group_and_take_bucket_shapes(tmp_path) -> None:
    images, annotations = _mixed_coco(tmp_path)
    loader, dataset = build_train_loader(_cfg(images, annotations), 3, seed=0, pin_memory=False)
    groups = aspect_groups(dataset.image_sizes(), 2)
    index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    shapes = set()
    for batch in itertools.islice(loader, 30):
        batch_groups = {int(groups[index_of[int(i)]]) for i in batch.image_ids}
        assert len(batch_groups) == 1
        shapes.add(tuple(batch.images.shape[-2:]))
        assert torch.all(batch.sizes[:, 0] <= batch.images.shape[-2])
        assert torch.all(batch.sizes[:, 1] <= batch.images.shape[-1])
    assert shapes <= set(loader.policy.buckets) and len(loader.policy.buckets) <= 6


def test_train_batches_hold_one_jitter_level_so_they_pad_to_its_bucket(tmp_path) -> None:
    """Images whose drawn shorter sides fall in one level share a batch: none is padded to the largest
    jitter another image of its aspect group drew."""
    import bisect

    from retinaflow.data.sampler import train_batches
    from retinaflow.data.transforms import TrainTransform

    images, annotations = _mixed_coco(tmp_path)
    cfg = _cfg(images, annotations, aspect_groups=2, bucket_levels=3)
    _, dataset = build_train_loader(cfg, 3, seed=0, pin_memory=False)
    groups = aspect_groups(dataset.image_sizes(), 2)
    levels = shorter_levels(*cfg.jitter, 3)
    transform = TrainTransform(cfg)
    sampler, _ = train_batches(dataset, cfg, 3, 0, 0, 1, 0)
    seen = set()
    for items in itertools.islice(sampler, 30):
        drawn = [(i, transform.draw(seed).shorter) for i, seed in items]
        keys = {(int(groups[i]), bisect.bisect_left(levels, s)) for i, s in drawn}
        assert len(keys) == 1
        seen |= keys
    assert len({level for _, level in seen}) == 3  # every level trained


@pytest.mark.parametrize("start", [1, 7, 13])
def test_grouped_resume_sees_the_data_an_uninterrupted_run_would(tmp_path, start) -> None:
    images, annotations = _mixed_coco(tmp_path)
    cfg = _cfg(images, annotations)
    full, _ = build_train_loader(cfg, 4, seed=3, pin_memory=False)
    expected = list(itertools.islice(full, start + 5))[start:]
    resumed, _ = build_train_loader(cfg, 4, seed=3, start_iteration=start, pin_memory=False)
    got = list(itertools.islice(resumed, 5))
    for a, b in zip(expected, got, strict=True):
        assert a.image_ids.tolist() == b.image_ids.tolist()
        assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    assert resumed.iteration == start + 5


def test_grouped_ranks_stay_disjoint_within_an_epoch(tmp_path) -> None:
    images, annotations = _mixed_coco(tmp_path, n=24)
    cfg = _cfg(images, annotations, aspect_groups=2, bucket_levels=1)  # few groups: 4 steps stay in epoch 0
    seen = []
    for rank in range(2):
        loader, _ = build_train_loader(cfg, 2, seed=0, rank=rank, world_size=2, pin_memory=False)
        # the first 4 batches of 2 can only come from this rank's 12 images of epoch 0
        seen.append({int(i) for b in itertools.islice(loader, 4) for i in b.image_ids})
    assert not seen[0] & seen[1]


def test_eval_batches_are_grouped_cover_every_image_once_and_use_buckets(tmp_path) -> None:
    images, annotations = _mixed_coco(tmp_path, n=20)
    cfg = _cfg(images, annotations)
    ids = []
    for rank in range(2):
        loader, dataset = build_eval_loader(images, annotations, cfg, 4, rank, 2, pin_memory=False)
        for batch in loader:
            ids.extend(batch.image_ids.tolist())
            assert tuple(batch.images.shape[-2:]) in loader.policy.buckets
    assert sorted(ids) == sorted(dataset.image_ids)
    stride_cfg = _cfg(images, annotations, shapes="stride")
    loader, _ = build_eval_loader(images, annotations, stride_cfg, 4, pin_memory=False)
    assert not loader.policy.bounded and sum(len(b) for b in loader) == 20


def test_sharded_eval_runs_each_image_in_its_one_rank_batch(tmp_path) -> None:
    """Same batch composition (so same padded shape) on N ranks as on one: identical detections."""
    images, annotations = _mixed_coco(tmp_path, n=20)
    cfg = _cfg(images, annotations)

    def batches(rank: int, world: int) -> list[tuple[int, ...]]:
        loader, _ = build_eval_loader(images, annotations, cfg, 3, rank, world, pin_memory=False)
        return [tuple(b.image_ids.tolist()) for b in loader]

    alone = batches(0, 1)
    shards = [batches(rank, 3) for rank in range(3)]
    assert sorted(b for s in shards for b in s) == sorted(alone)
    assert shards[1] == alone[1::3]


def test_grouped_ranks_share_each_step_group_and_together_draw_the_one_gpu_batch(tmp_path) -> None:
    """2 ranks x batch 3 at step k = the batch of 6 one rank draws at step k, and one aspect group."""
    from retinaflow.data.sampler import train_batches

    images, annotations = _mixed_coco(tmp_path)
    cfg = _cfg(images, annotations)
    _, dataset = build_train_loader(cfg, 3, seed=0, pin_memory=False)
    groups = aspect_groups(dataset.image_sizes(), 2)

    def steps(batch: int, rank: int, world: int) -> list[list[tuple[int, ...]]]:
        sampler, _ = train_batches(dataset, cfg, batch, 7, rank, world, 0)
        return [[item[:2] for item in b] for b in itertools.islice(sampler, 20)]  # several epochs

    one = steps(6, 0, 1)
    ranks = [steps(3, rank, 2) for rank in range(2)]
    for k, alone in enumerate(one):
        together = ranks[0][k] + ranks[1][k]
        assert sorted(together) == sorted(alone)  # same images, same augmentation seeds
        assert len({int(groups[i]) for i, _ in together}) == 1


def test_ddp_ranks_pad_to_the_global_batch_bucket_as_one_gpu_does(tmp_path) -> None:
    images, annotations = _mixed_coco(tmp_path)
    cfg = _cfg(images, annotations)
    one, _ = build_train_loader(cfg, 6, seed=2, pin_memory=False)
    ranks = [
        build_train_loader(cfg, 3, seed=2, rank=rank, world_size=2, pin_memory=False)[0] for rank in range(2)
    ]
    for alone, *parts in itertools.islice(zip(one, *ranks, strict=False), 10):
        assert all(p.images.shape[-2:] == alone.images.shape[-2:] for p in parts)
        assert sorted(i for p in parts for i in p.image_ids.tolist()) == sorted(alone.image_ids.tolist())

        # (id, scale) orders them: a group's buffer may hold one image of two epochs, drawn differently
        def ordered(images, ids, scales):
            return images[(ids.double() + scales.double() / 1000).argsort()]

        together = [torch.cat([getattr(p, k) for p in parts]) for k in ("images", "image_ids", "scales")]
        assert torch.equal(ordered(*together), ordered(alone.images, alone.image_ids, alone.scales))
