"""The DALI loader's host source (``dali.BatchSource``): its producer thread keeps the plans' order, raises
a failure from the call that would have returned that batch, ends cleanly and stops on ``close``; it passes
over corrupt files as ``CocoDataset`` does, and after a decoder failure ``restarted`` prepares the batches
in flight again. No DALI needed: the source is plain Python."""

from __future__ import annotations

import itertools
import time

import pytest

from retinaflow.data.coco import CocoDataset
from retinaflow.data.dali_source import BatchSource, DaliDecodeError, Plan, restarted
from retinaflow.data.shapes import ShapePolicy
from retinaflow.errors import DataError

from .conftest import truncate
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


@pytest.mark.parametrize("replace", [True, False], ids=["train", "eval"])
def test_corrupt_files_are_passed_over_and_counted(dataset, replace) -> None:
    """Training takes the next image in a corrupt one's place (its flip kept); evaluation leaves it out
    and sends no batch at all when nothing is left. Either way the ids go to ``skipped``."""
    truncate(dataset.file_path(1))
    dataset.file_path(4).write_bytes(b"")
    skipped: set[int] = set()
    plans = iter(_plans([[0, 1], [4], [5, 3]]))
    source = BatchSource(dataset, plans, ShapePolicy((), 32), 96, False, replace, skipped)
    try:
        batches = []
        with pytest.raises(StopIteration):
            while True:
                flips = [int(f) for f in source()[3]]
                batch, _ = source.pop()
                batches.append((batch.image_ids.tolist(), batch.skipped, flips))
    finally:
        source.close()
    ids = dataset.image_ids  # index i holds image id i + 1
    if replace:  # index 1 -> 2 (flip of plan 1), index 4 -> 5
        expected = [([ids[0], ids[2]], (2,), [0, 1]), ([ids[5]], (5,), [0]), ([ids[5], ids[3]], (), [1, 1])]
        assert batches == expected
    else:
        assert batches == [([ids[0]], (2,), [0]), ([ids[5], ids[3]], (), [1, 1])]
    assert skipped == {2, 5} and dataset.report()["corrupt_images"] == 2


def test_a_restart_prepares_the_batches_in_flight_again_without_the_file_that_failed(dataset) -> None:
    """A file that passes the structural check but does not decode: found by a CPU decode, recorded, and
    the batches not yet popped come again from the new source, in order, followed by the rest."""
    dataset.file_path(2).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg \xff\xd9")
    plans = iter(_plans([[0, 1], [2, 3], [4, 5], [1, 0]]))
    source = BatchSource(dataset, plans, ShapePolicy((), 32), 96, False)
    source()
    source.pop()  # batch 1 delivered; DALI then fails on batch 2
    source()
    again = restarted(source, DaliDecodeError("decoder failed"))
    try:
        assert dataset.is_corrupt(3) and not source._thread.is_alive()
        got = []
        for _ in range(3):
            again()
            got.append(again.pop()[0].image_ids.tolist())
        assert got == [[4, 4], [5, 6], [2, 1]]  # index 2 replaced by index 3 (id 4)
    finally:
        again.close()


def test_a_restart_that_finds_no_corrupt_file_raises_the_decoder_error(dataset) -> None:
    source = BatchSource(dataset, iter(_plans([[0, 1], [2, 3]])), ShapePolicy((), 32), 96, False)
    source()
    with pytest.raises(DaliDecodeError, match="decoder failed"):
        restarted(source, DaliDecodeError("decoder failed"))


def test_a_dataset_without_one_readable_image_is_refused_with_what_to_do(dataset) -> None:
    for index in range(len(dataset)):
        dataset.file_path(index).write_bytes(b"GIF89a")
    source = BatchSource(dataset, iter(_plans([[0, 1]])), ShapePolicy((), 32), 96, False)
    try:
        with pytest.raises(DataError, match=r"none of the 6 images .* --loader torch"):
            source()
    finally:
        source.close()
