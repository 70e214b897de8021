from __future__ import annotations

import numpy as np

from retinaflow.data.sampler import sample_seeds
from retinaflow.data.transforms import jitter_shorter


def test_sample_seeds_are_63_bit_and_a_function_of_seed_epoch_and_index() -> None:
    indices = np.arange(10_000)
    seeds = sample_seeds(3, 0, indices)
    assert seeds.dtype == np.uint64 and int(seeds.max()) < 2**63
    assert len(np.unique(seeds)) == len(indices)
    assert np.array_equal(seeds, sample_seeds(3, 0, indices))
    assert np.array_equal(seeds[[7, 42]], sample_seeds(3, 0, np.array([7, 42])))  # vectorised = one by one
    for other in (sample_seeds(3, 1, indices), sample_seeds(4, 0, indices)):  # another epoch, another run
        assert not np.isin(seeds, other).any()


def test_the_jitter_drawn_from_the_seeds_is_uniform_over_its_range() -> None:
    shorter = jitter_shorter(sample_seeds(0, 0, np.arange(200_000)), (640, 1024))
    counts = np.bincount(shorter - 640, minlength=385)
    assert shorter.min() == 640 and shorter.max() == 1024 and len(counts) == 385
    assert np.abs(counts / counts.mean() - 1).max() < 0.3  # ~520 each: 0.3 is ~7 standard deviations
    assert jitter_shorter(int(sample_seeds(0, 0, np.array([5]))[0]), (640, 1024)) == shorter[5]


def test_padding_counts_what_the_loader_pads_and_training_logs_it(tmp_path, caplog) -> None:
    import itertools

    from retinaflow.data.loader import build_train_loader
    from retinaflow.data.sampler import padding

    from .test_shapes import _cfg, _mixed_coco

    images, annotations = _mixed_coco(tmp_path)
    cfg = _cfg(images, annotations)
    with caplog.at_level("INFO", logger="retinaflow.data.sampler"):
        loader, dataset = build_train_loader(cfg, 3, seed=0, pin_memory=False)
    assert "padding: " in caplog.text and "% of a training batch's pixels" in caplog.text
    batches = list(itertools.islice(loader, 12))
    pad = padding(loader.batch_sampler, loader.policy, dataset.image_sizes(), cfg, count=12)
    count = sum(len(b) for b in batches)
    padded = sum(b.images.shape[-2] * b.images.shape[-1] * len(b) for b in batches)
    own = sum(int(b.sizes.prod(dim=1).sum()) for b in batches)
    assert abs(pad.padded_mpx - padded / count / 1e6) < 1e-9 and abs(pad.image_mpx - own / count / 1e6) < 1e-9
    assert pad.shapes == len({tuple(b.images.shape[-2:]) for b in batches})
