"""The DALI loader's host source (``dali.BatchSource``): its producer thread keeps the plans' order, raises
a failure from the call that would have returned that batch, ends cleanly and stops on ``close``. No DALI
needed: the source is plain Python."""

from __future__ import annotations

import itertools
import time

import pytest

from retinaflow.data.coco import CocoDataset
from retinaflow.data.dali import BatchSource, Plan
from retinaflow.data.shapes import ShapePolicy

from .test_shapes import _mixed_coco


@pytest.fixture
def dataset(tmp_path) -> CocoDataset:
    images, annotations = _mixed_coco(tmp_path, n=6)
    return CocoDataset(images, annotations, None)


def _plans(indices: list[list[int]]) -> list[list[Plan]]:
    return [[Plan(i, 48, bool(i % 2), (1.0, 1.0, 1.0)) for i in batch] for batch in indices]


def test_batches_come_in_the_plans_order_then_the_epoch_ends(dataset) -> None:
    batches = [[0, 1], [2, 3], [4, 5], [1, 0]]
    source = BatchSource(dataset, iter(_plans(batches)), ShapePolicy((), 32), 96, colour=True, ahead=2)
    try:
        for indices in batches:
            files, rx, ry, flips, shapes = source()
            assert len(files) == len(rx) == len(ry) == len(flips) == len(shapes) == len(indices)
            assert [f.tobytes() for f in files] == [dataset.file_path(i).read_bytes() for i in indices]
            assert [int(f) for f in flips] == [i % 2 for i in indices]
        for indices in batches:  # targets in the same order as the inputs
            batch, factors = source.pop()
            assert batch.image_ids.tolist() == [dataset.image_ids[i] for i in indices]
            assert factors is not None and factors.shape == (len(indices), 3)
        for _ in range(2):  # and every later call ends too
            with pytest.raises(StopIteration):
                source()
    finally:
        source.close()


def test_a_failure_is_raised_for_its_own_batch(dataset) -> None:
    def plans():
        yield from _plans([[0, 1]])
        raise ValueError("plan 2 is broken")

    source = BatchSource(dataset, plans(), ShapePolicy((), 32), 96, colour=False)
    try:
        files, *_ = source()
        assert len(files) == 2
        with pytest.raises(ValueError, match="plan 2 is broken"):
            source()
    finally:
        source.close()


def test_close_stops_a_producer_waiting_for_room(dataset) -> None:
    endless = itertools.cycle(_plans([[0, 1, 2]]))
    source = BatchSource(dataset, endless, ShapePolicy((), 32), 96, colour=False, ahead=1)
    source()
    time.sleep(0.2)  # the producer fills the queue and waits
    started = time.perf_counter()
    source.close()
    assert not source._thread.is_alive()
    assert time.perf_counter() - started < 2.0
