from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from retinaflow.config import DataConfig
from retinaflow.data.transforms import (
    EvalTransform,
    TrainTransform,
    clip_boxes,
    hflip,
    hflip_boxes,
    resize,
    resize_boxes,
    resize_scale,
)
from retinaflow.errors import ConfigError


def _image_with_box(h: int, w: int, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Black (3, h, w) uint8 image with a white filled rectangle at ``box`` (x1y1x2y2, exclusive ends)."""
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    return image, torch.tensor([box], dtype=torch.float32)


def _bright_extent(image: torch.Tensor) -> list[float]:
    """x1y1x2y2 of the pixels brighter than mid-grey."""
    ys, xs = torch.nonzero(image.float().mean(0) > 127, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_resize_scale_shorter_side_and_max_size_cap() -> None:
    assert resize_scale(100, 200, 50, 1000) == 0.5
    assert resize_scale(300, 150, 600, 2000) == 4.0
    assert resize_scale(300, 150, 600, 1000) == pytest.approx(1000 / 300)  # 4.0 would make 1200 > 1000
    assert resize_scale(100, 400, 800, 1000) == pytest.approx(2.5)  # capped: longer side 1000, not 3200
    assert resize_scale(100, 400, 800, 0) == 8.0  # no cap


def test_resize_scales_boxes_by_the_returned_factor() -> None:
    image, boxes = _image_with_box(60, 80, (10, 20, 50, 40))
    out, out_boxes = resize(image, boxes, 1.5)
    assert out.shape == (3, 90, 120) and out.dtype == torch.uint8
    torch.testing.assert_close(out_boxes, boxes * 1.5)
    extent = _bright_extent(out)
    assert max(abs(a - b) for a, b in zip(extent, out_boxes[0].tolist(), strict=True)) <= 1.0


def test_resize_clips_boxes_to_the_new_image() -> None:
    image = torch.zeros((3, 10, 10), dtype=torch.uint8)
    _, out = resize(image, torch.tensor([[2.0, 2.0, 10.4, 10.0]]), 2.0)
    assert out.tolist() == [[4.0, 4.0, 20.0, 20.0]]


def test_flip_twice_is_identity_and_flip_moves_boxes() -> None:
    image, boxes = _image_with_box(30, 50, (5, 3, 20, 12))
    once_image, once_boxes = hflip(image, boxes)
    assert once_boxes.tolist() == [[30.0, 3.0, 45.0, 12.0]]
    assert type(once_boxes) is torch.Tensor
    assert _bright_extent(once_image) == once_boxes[0].tolist()
    twice_image, twice_boxes = hflip(once_image, once_boxes)
    assert torch.equal(twice_image, image) and torch.equal(twice_boxes, boxes)


def test_train_transform_keeps_boxes_on_the_object() -> None:
    cfg = DataConfig(jitter=(40, 90), max_size=200, flip=0.5, color_jitter=0.2)
    transform = TrainTransform(cfg)
    image, boxes = _image_with_box(60, 100, (10, 20, 40, 50))
    flipped = 0
    for seed in range(12):
        out, out_boxes, scale = transform(image, boxes.clone(), seed)
        h, w = out.shape[-2:]
        assert 40 <= min(h, w) <= 90 and max(h, w) <= 200
        assert scale == pytest.approx(min(h, w) / 60, abs=0.02)
        extent = _bright_extent(out)
        assert max(abs(a - b) for a, b in zip(extent, out_boxes[0].tolist(), strict=True)) <= 1.5
        flipped += out_boxes[0, 0] > w / 2
    assert 0 < flipped < 12  # both flipped and unflipped outcomes occur


def test_train_transform_is_a_function_of_the_seed() -> None:
    transform = TrainTransform(DataConfig(jitter=(40, 90), max_size=200))
    image, boxes = _image_with_box(60, 100, (10, 20, 40, 50))
    image = image + torch.randint(
        0, 60, image.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    a = transform(image, boxes.clone(), 3)
    b = transform(image, boxes.clone(), 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    sizes = {transform(image, boxes.clone(), s)[0].shape for s in range(10)}
    assert len(sizes) > 3


def test_train_transform_respects_max_size_cap() -> None:
    transform = TrainTransform(DataConfig(jitter=(800, 800), max_size=300, flip=0.0, color_jitter=0.0))
    image, boxes = _image_with_box(50, 200, (0, 0, 200, 50))
    out, out_boxes, scale = transform(image, boxes, 0)
    assert out.shape == (3, 75, 300) and scale == 1.5
    assert out_boxes.tolist() == [[0.0, 0.0, 300.0, 75.0]]


def test_color_jitter_changes_pixels_but_not_geometry() -> None:
    base = torch.randint(30, 220, (3, 40, 40), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 30.0]])
    plain = TrainTransform(DataConfig(jitter=(40, 40), flip=0.0, color_jitter=0.0))
    jitter = TrainTransform(DataConfig(jitter=(40, 40), flip=0.0, color_jitter=0.4))
    a = plain(base, boxes.clone(), 5)
    b = jitter(base, boxes.clone(), 5)
    assert torch.equal(a[0], base) and not torch.equal(b[0], base)
    assert b[0].dtype == torch.uint8 and torch.equal(a[1], b[1])


def test_eval_transform_fixed_resize() -> None:
    image, boxes = _image_with_box(30, 60, (6, 3, 30, 27))
    out, out_boxes, scale = EvalTransform(90, 1000)(image, boxes)
    assert out.shape == (3, 90, 180) and scale == 3.0
    torch.testing.assert_close(out_boxes, boxes * 3)
    out, _, scale = EvalTransform(90, 120)(image, boxes)
    assert out.shape == (3, 60, 120) and scale == 2.0


@pytest.mark.parametrize(
    "kwargs", [{"jitter": (90, 40)}, {"jitter": (0, 10)}, {"flip": 1.5}, {"color_jitter": -0.1}]
)
def test_bad_augmentation_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        TrainTransform(DataConfig(**kwargs))
    with pytest.raises(ConfigError):
        EvalTransform(0, 100)


def test_colour_jitter_batch_is_torchvision_per_image_and_keeps_the_padding_zero() -> None:
    from retinaflow.data.transforms import colour_jitter_batch

    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[20, 30], [32, 17], [9, 40]])
    batch = torch.zeros(3, 3, 32, 40, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes.tolist()):
        batch[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
    factors = torch.tensor([[1.1, 0.9, 1.05], [0.9, 1.1, 0.95], [1.0, 1.0, 1.0]])
    out = colour_jitter_batch(batch, sizes, factors)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    for i, (h, w) in enumerate(sizes.tolist()):
        image = batch[i, :, :h, :w]
        b, c, s = factors[i].tolist()
        ref = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(image, b), c), s)
        diff = (out[i, :, :h, :w].int() - ref.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01  # float summation order
        assert not out[i, :, h:].any() and not out[i, :, :, w:].any()


def test_colour_jitter_batch_takes_sizes_and_factors_from_the_host() -> None:
    """The DALI loader keeps sizes and factors on the host while the batch is on the GPU; a meta-device
    batch stands in for the GPU here (mixing devices in one op raises, as it did on the GPU)."""
    from retinaflow.data.transforms import colour_jitter_batch

    images = torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    out = colour_jitter_batch(images, torch.tensor([[8, 6], [5, 8]]), torch.ones(2, 3))
    assert out.device.type == "meta" and out.shape == images.shape and out.dtype == torch.uint8


def test_box_transforms_with_per_box_sizes_equal_the_per_image_calls() -> None:
    """The DALI loader transforms a whole batch's boxes at once (per-box sizes and scales): bit for bit what
    the torch loader's per-image calls give."""
    gen = torch.Generator().manual_seed(0)
    images = [(480, 640, 0.7123), (427, 640, 1.25), (640, 480, 800 / 480)]  # (h, w, scale) per image
    per_image, rows = [], []
    for h, w, scale in images:
        boxes = torch.rand(5, 4, generator=gen) * 900 - 100  # some outside the image
        nh, nw = round(h * scale), round(w * scale)
        per_image.append(hflip_boxes(resize_boxes(clip_boxes(boxes, h, w), scale, nh, nw), nh, nw))
        rows.append((boxes, h, w, scale, nh, nw))
    boxes = torch.cat([r[0] for r in rows])
    h, w, scale, nh, nw = (torch.tensor([r[k] for r in rows]).repeat_interleave(5) for k in range(1, 6))
    batched = hflip_boxes(resize_boxes(clip_boxes(boxes, h, w), scale, nh, nw), nh, nw)
    assert torch.equal(batched, torch.cat(per_image))
