"""DALI loader vs the torch loader: same batches, same boxes exactly, pixels within a measured tolerance.

Tolerance, over the images' own pixels (the padding is zero in both), measured on random-noise JPEGs, the
worst case for resampling (CPU: DALI's and torchvision's libjpeg-turbo decoders), colour jitter on:
upscaling differs by a mean of 0.19-0.20 levels with none more than 4 apart, downscaling by a mean of
0.37-0.42 with 0.8-1.3 % of values more than 4 (up to 13) apart (5 seeds, 8 batches each). Asserted over a
run of batches: mean |diff| <= 0.5, <= 2 % beyond 4.
The GPU decoder (nvJPEG) may add IDCT differences: mean <= 1.0, <= 2 % beyond 4, on smooth images.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinaflow.data import select
from retinaflow.data.batch import Batch
from retinaflow.data.loader import build_eval_loader, build_train_loader
from retinaflow.errors import MissingDependency

from .conftest import truncate
from .test_shapes import _cfg, _mixed_coco

pytest.importorskip("nvidia.dali")

from retinaflow.data.dali import _dali_reason, build_dali_eval_loader, build_dali_train_loader

CPU = torch.device("cpu")


def _pixel_diffs(a: Batch, b: Batch) -> torch.Tensor:
    """|a - b| over the images' own pixels (flat float); the padded shapes and the padding are equal."""
    assert a.images.shape == b.images.shape and a.images.dtype == b.images.dtype == torch.uint8
    content = torch.zeros(a.images.shape, dtype=torch.bool)
    for i, (h, w) in enumerate(a.sizes.tolist()):
        content[i, :, :h, :w] = True
    x, y = a.images.int(), b.images.cpu().int()
    assert torch.equal(x[~content], y[~content])
    return (x[content] - y[content]).abs().float()


def _assert_close_pixels(diffs: list[torch.Tensor], mean: float, share: float) -> None:
    """The pixel differences of a run of batches within the tolerance (per run: one batch of three
    noise images can stray further, e.g. a mean of 0.53 where its run's was 0.42)."""
    diff = torch.cat(diffs)
    assert float(diff.mean()) <= mean, float(diff.mean())
    assert float((diff > 4).float().mean()) <= share, float((diff > 4).float().mean())


def _smooth(images: Path) -> None:
    """Rewrite every JPEG of ``images`` as a smooth colour field of the same size (photo-like spectrum)."""
    for path in sorted(images.glob("*.jpg")):
        with Image.open(path) as im:
            w, h = im.size
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        seed = int(path.stem)
        rgb = [127 + 100 * np.sin(x / (7 + seed % 5 + c) + y / (11 + c) + seed) for c in range(3)]
        Image.fromarray(np.stack(rgb, -1).clip(0, 255).astype(np.uint8)).save(path, quality=90)


def _compare_train(
    tmp_path: Path, device: torch.device, jitter: tuple[int, int], max_size: int, tol, smooth: bool = False
) -> None:
    images, annotations = _mixed_coco(tmp_path)
    if smooth:
        _smooth(images)
    cfg = _cfg(images, annotations, jitter=jitter, max_size=max_size, color_jitter=0.1)
    ref, _ = build_train_loader(cfg, 3, seed=1, pin_memory=False)
    dali, _ = build_dali_train_loader(cfg, 3, 1, 0, 1, 0, device)
    diffs = []
    for a, b in zip(itertools.islice(ref, 8), itertools.islice(dali, 8), strict=True):
        assert a.image_ids.tolist() == b.image_ids.tolist()
        assert torch.equal(a.boxes, b.boxes.cpu()) and torch.equal(a.labels, b.labels.cpu())
        assert torch.equal(a.sizes, b.sizes) and torch.equal(a.scales, b.scales)
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        diffs.append(_pixel_diffs(a, b))
    _assert_close_pixels(diffs, *tol)


@pytest.mark.parametrize(("jitter", "max_size"), [((48, 96), 160), ((20, 32), 60)], ids=["up", "down"])
def test_train_batches_match_the_torch_loader_cpu(tmp_path, jitter, max_size) -> None:
    _compare_train(tmp_path, CPU, jitter, max_size, (0.5, 0.02))


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_rank_batches_match_the_torch_loader_cpu(tmp_path, rank) -> None:
    """Under DDP both loaders take the same slice of the global batch and pad to its bucket."""
    images, annotations = _mixed_coco(tmp_path)
    cfg = _cfg(images, annotations, color_jitter=0.1)
    ref, _ = build_train_loader(cfg, 3, seed=1, rank=rank, world_size=2, pin_memory=False)
    dali, _ = build_dali_train_loader(cfg, 3, 1, rank, 2, 0, CPU)
    diffs = []
    for a, b in zip(itertools.islice(ref, 6), itertools.islice(dali, 6), strict=True):
        assert a.image_ids.tolist() == b.image_ids.tolist() and torch.equal(a.boxes, b.boxes)
        diffs.append(_pixel_diffs(a, b))  # same padded shape too
    _assert_close_pixels(diffs, 0.5, 0.02)


def test_eval_batches_match_the_torch_loader_cpu(tmp_path) -> None:
    images, annotations = _mixed_coco(tmp_path, n=14)
    cfg = _cfg(images, annotations, resize=40, max_size=64)
    for rank in range(2):
        ref, _ = build_eval_loader(images, annotations, cfg, 4, rank, 2, pin_memory=False)
        dali, _ = build_dali_eval_loader(images, annotations, cfg, 4, rank, 2, CPU)
        assert len(ref) == len(dali)
        diffs = []
        for a, b in zip(ref, dali, strict=True):
            assert a.image_ids.tolist() == b.image_ids.tolist() and torch.equal(a.sizes, b.sizes)
            diffs.append(_pixel_diffs(a, b))
        _assert_close_pixels(diffs, 0.5, 0.02)


def test_dali_resume_is_exact(tmp_path) -> None:
    images, annotations = _mixed_coco(tmp_path)
    cfg = _cfg(images, annotations, color_jitter=0.1)
    full, _ = build_dali_train_loader(cfg, 4, 5, 0, 1, 0, CPU)
    expected = list(itertools.islice(full, 9))[6:]
    resumed, _ = build_dali_train_loader(cfg, 4, 5, 0, 1, 6, CPU)
    for a, b in zip(expected, itertools.islice(resumed, 3), strict=True):
        assert a.image_ids.tolist() == b.image_ids.tolist() and torch.equal(a.images, b.images)


def _corrupt_two(images: Path) -> None:
    """Image 3 truncated (found by the source's structural check), image 6 a JPEG with both markers but
    nothing decodable between them (passes the check; DALI's decoder fails on it: a restart)."""
    truncate(images / "000003.jpg")
    (images / "000006.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg \xff\xd9")


NEEDS_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    "device", [CPU, pytest.param(torch.device("cuda"), marks=NEEDS_GPU)], ids=["cpu", "gpu_mixed_decoder"]
)
def test_corrupt_images_are_skipped_and_counted_as_in_the_torch_loader(tmp_path, device) -> None:
    images, annotations = _mixed_coco(tmp_path, n=9)
    _corrupt_two(images)
    cfg = _cfg(images, annotations, color_jitter=0.1)
    ref, ref_data = build_train_loader(cfg, 2, seed=1, pin_memory=False)
    dali, dali_data = build_dali_train_loader(cfg, 2, 1, 0, 1, 0, device)
    for a, b in zip(itertools.islice(ref, 9), itertools.islice(dali, 9), strict=True):  # two epochs
        assert a.image_ids.tolist() == b.image_ids.tolist() and a.skipped == b.skipped
        assert torch.equal(a.boxes, b.boxes.cpu()) and a.images.shape == b.images.shape
    assert ref.skipped_ids == dali.skipped_ids == {3, 6}
    assert ref_data.report()["corrupt_images"] == dali_data.report()["corrupt_images"] == 2
    dali.close()


def test_eval_leaves_corrupt_images_out_as_the_torch_loader_cpu(tmp_path) -> None:
    images, annotations = _mixed_coco(tmp_path, n=9)
    _corrupt_two(images)
    cfg = _cfg(images, annotations)
    ref, _ = build_eval_loader(images, annotations, cfg, 1, pin_memory=False)
    dali, data = build_dali_eval_loader(images, annotations, cfg, 1, 0, 1, CPU)
    expected = [b.image_ids.tolist() for b in ref]
    assert [b.image_ids.tolist() for b in dali] == expected and len(expected) == 7  # no empty batch
    assert dali.skipped_ids == ref.skipped_ids == {3, 6} and data.report()["corrupt_images"] == 2
    assert [b.image_ids.tolist() for b in dali] == expected  # a second pass: known, skipped at once


def test_the_reason_of_a_dali_error_names_the_operator_and_what_it_met() -> None:
    text = (
        "Critical error in pipeline:\nCritical error in pipeline:\nError in CPU operator "
        "`nvidia.dali.fn.decoders.image`,\nwhich was used in the pipeline definition with the following "
        'traceback:\n\n  File "dali.py", line 248, in pipeline\n\nencountered:\n\nnvImageCodec failure: '
        "'#3'\nCurrent pipeline object is no longer valid."
    )
    operator = "Error in CPU operator `nvidia.dali.fn.decoders.image`"
    assert _dali_reason(text) == f"{operator}: nvImageCodec failure: '#3'"
    assert _dali_reason("something else\nmore") == "something else"


def test_loader_choice(monkeypatch) -> None:
    assert select.resolve_loader("auto", CPU) == "torch"
    assert select.resolve_loader("auto", torch.device("cuda")) == "dali"
    monkeypatch.setattr(select, "dali_installed", lambda: False)
    assert select.resolve_loader("auto", torch.device("cuda")) == "torch"
    with pytest.raises(MissingDependency, match=r"pip install retinaflow\[dali\]"):
        select.resolve_loader("dali", CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("jitter", "max_size"), [((48, 96), 160), ((20, 32), 60)], ids=["up", "down"])
def test_train_batches_match_the_torch_loader_gpu_mixed_decoder(tmp_path, jitter, max_size) -> None:
    # nvJPEG upsamples chroma differently from libjpeg-turbo: on random-noise JPEGs the mean difference
    # was 6.6 (up) / 1.5 (down) levels (H200, DALI 2.4.0). Photos are smooth at the pixel scale, so the
    # decoders are compared on smooth images, where the same tolerance as for the CPU decoder must hold.
    _compare_train(tmp_path, torch.device("cuda"), jitter, max_size, (1.0, 0.02), smooth=True)


def test_dali_decodes_16_bit_png_and_exif_rotation_like_the_torch_path(tmp_path) -> None:
    """Issue 11's decoding rules hold in both loaders: 16-bit samples scaled to 8 bits (DALI rounds where
    the torch path keeps the high byte: <= 1 level apart), the EXIF orientation applied (exact)."""
    import json

    from .test_image_formats import RGB16, _exif_jpeg, write_png16

    images = tmp_path / "images"
    images.mkdir()
    write_png16(images / "a.png", RGB16)  # 30x40
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :10] = 255
    _exif_jpeg(images / "b.jpg", stored, 6)  # displayed 40 high, 30 wide
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.jpg", "width": 30, "height": 40},
        ],
        "annotations": [
            {"id": i, "image_id": i, "bbox": [1, 1, 5, 5], "category_id": 1, "area": 25, "iscrowd": 0}
            for i in (1, 2)
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(coco))
    cfg = _cfg(images, annotations, resize=40, max_size=40, aspect_groups=1)
    ref, _ = build_eval_loader(images, annotations, cfg, 1, pin_memory=False)
    dali, _ = build_dali_eval_loader(images, annotations, cfg, 1, 0, 1, CPU)
    for a, b in zip(ref, dali, strict=True):
        assert torch.equal(a.sizes, b.sizes)
        assert int((a.images.int() - b.images.int()).abs().max()) <= 1
