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
