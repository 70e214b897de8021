"""Catalogue: the image files retinaflow reads, and what the model sees of them.

Every accepted file decodes to (3, H, W) uint8 RGB as labelling tools display it: 16-bit samples are
scaled to 8 bits (``to_uint8``: the high byte), and the EXIF orientation is applied, so H x W is the
displayed size that COCO ``width``/``height`` describe.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinaflow.data.coco import CocoDataset
from retinaflow.data.images import decode_file, encoded_problem, to_uint8
from retinaflow.data.validate import validate_dataset

from .conftest import ann

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
RGB16 = RNG.integers(0, 65536, size=(30, 40, 3), dtype=np.uint16)


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)), written by hand: PIL cannot write 16-bit RGB."""
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _save(path: Path, array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> None:
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, fmt, **kw)


# -- 8-bit formats: exact pixels (lossless) or close (JPEG) -------------------------------------
LOSSLESS = {
    "PNG RGB": ("png", "PNG", None),
    "PNG RGBA (alpha dropped)": ("png", "PNG", "RGBA"),
    "BMP": ("bmp", "BMP", None),
    "TIFF": ("tif", "TIFF", None),
    "WEBP lossless": ("webp", "WEBP", None),
}


@pytest.mark.parametrize(("suffix", "fmt", "mode"), LOSSLESS.values(), ids=LOSSLESS.keys())
def test_lossless_8bit_rgb(tmp_path: Path, suffix: str, fmt: str, mode: str | None) -> None:
    path = tmp_path / f"a.{suffix}"
    _save(path, RGB8, fmt, mode, **({"lossless": True} if fmt == "WEBP" else {}))
    image = decode_file(path)
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(RGB8).permute(2, 0, 1))


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("P", "PNG"), ("P", "GIF")], ids=["greyscale", "palette", "GIF"]
)
def test_greyscale_and_palette_become_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    path = tmp_path / f"a.{fmt.lower()}"
    _save(path, RGB8, fmt, mode)
    expected = np.array(Image.open(path).convert("RGB"))
    assert torch.equal(decode_file(path), torch.from_numpy(expected).permute(2, 0, 1))


def test_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    _save(path, RGB8, "JPEG", quality=100)
    image = decode_file(path)
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8


# -- 16-bit PNG: scaled, not truncated ----------------------------------------------------------
def test_16bit_rgb_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    write_png16(tmp_path / "a.png", RGB16)
    image = decode_file(tmp_path / "a.png")
    expected = torch.from_numpy((RGB16 >> 8).astype(np.uint8)).permute(2, 0, 1)
    assert image.dtype == torch.uint8 and torch.equal(image, expected)


def test_16bit_greyscale_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    write_png16(tmp_path / "a.png", RGB16[..., 0])
    image = decode_file(tmp_path / "a.png")
    grey = torch.from_numpy((RGB16[..., 0] >> 8).astype(np.uint8))
    assert image.dtype == torch.uint8 and torch.equal(image, grey.expand(3, -1, -1))


def test_to_uint8_rule() -> None:
    """The one conversion rule (the DALI path mirrors it): uint8 as is, uint16 keeps its high byte."""
    assert torch.equal(to_uint8(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0, 255]).byte())
    wide = torch.tensor([0, 255, 256, 32768, 65535], dtype=torch.uint16)
    assert to_uint8(wide).tolist() == [0, 0, 1, 128, 255] and to_uint8(wide).dtype == torch.uint8


def test_16bit_png_trains_like_its_8bit_version(make_coco) -> None:
    images, annotations = make_coco(1, [ann(1, 1, [2, 3, 10, 8])], size=(40, 30))
    write_png16(images / "000001.jpg", RGB16)  # the file name's suffix does not matter
    sample = CocoDataset(images, annotations)[0]
    assert sample.image is not None and sample.image.dtype == torch.uint8
    assert int(sample.image.max()) == int((RGB16 >> 8).max())


# -- EXIF orientation: decoded as displayed ------------------------------------------------------
def _exif_jpeg(path: Path, array: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=100, exif=exif.tobytes())
    path.write_bytes(buffer.getvalue())


# orientation -> how the stored pixels (H, W) are displayed
DISPLAYED = {
    1: lambda a: a,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 degrees counter-clockwise: turn clockwise
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", DISPLAYED)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = np.zeros((30, 40, 3), dtype=np.uint8)
    stored[:10, :10] = 255  # a white corner shows where the top-left went
    _exif_jpeg(tmp_path / "a.jpg", stored, orientation)
    image = decode_file(tmp_path / "a.jpg")
    expected = np.ascontiguousarray(DISPLAYED[orientation](stored))
    assert image.shape[1:] == expected.shape[:2]
    white = image[0].numpy() > 128
    assert (white == (expected[..., 0] > 128)).mean() > 0.97


def test_exif_rotated_photo_matches_its_json_size(make_coco) -> None:
    """A phone photo stored 40x30 with orientation 6 is displayed (and labelled) 30x40."""
    images, annotations = make_coco(1, [ann(1, 1, [2, 3, 10, 20])], size=(30, 40))
    _exif_jpeg(images / "000001.jpg", RGB8, 6)
    sample = CocoDataset(images, annotations)[0]
    assert sample.image is not None and sample.image.shape == (3, 40, 30)
    assert sample.boxes.tolist() == [[2.0, 3.0, 12.0, 23.0]]


def test_decoded_size_differing_from_the_json_is_warned_once(make_coco, caplog) -> None:
    """An annotation tool that ignored the EXIF orientation wrote the stored size: say so, once."""
    images, annotations = make_coco(1, [ann(1, 1, [2, 3, 10, 8])], size=(40, 30))
    _exif_jpeg(images / "000001.jpg", RGB8, 6)  # displayed 30x40, the JSON says 40x30
    dataset = CocoDataset(images, annotations)
    with caplog.at_level(logging.WARNING, logger="retinaflow.data.coco"):
        dataset[0], dataset[0]
    warnings = [r.getMessage() for r in caplog.records if "000001.jpg" in r.getMessage()]
    assert len(warnings) == 1
    assert "30x40" in warnings[0] and "40x30" in warnings[0] and "transpose" in warnings[0]


def test_validate_counts_sizes_that_are_the_transpose(make_coco, tmp_path: Path) -> None:
    images, annotations = make_coco(2, size=(40, 30))
    _exif_jpeg(images / "000001.jpg", RGB8, 6)
    report = validate_dataset(images, annotations, tmp_path / "out.json")
    assert report["size_mismatch"] == 1 and report["size_transposed"] == 1


# -- the DALI source's structural check of each file ---------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM"])
def test_complete_files_of_the_formats_dali_decodes_pass_the_check(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(RGB8).save(buffer, fmt)
    assert encoded_problem(buffer.getvalue()) is None
    assert encoded_problem(buffer.getvalue() + b"\0" * 100) is None  # trailing padding is common


@pytest.mark.parametrize(
    ("fmt", "problem"),
    [("JPEG", "truncated JPEG (no end-of-image marker)"), ("PNG", "truncated PNG (no IEND chunk)")],
)
def test_truncated_jpeg_and_png_are_found_without_decoding(fmt: str, problem: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(RGB8).save(buffer, fmt)
    data = buffer.getvalue()
    assert encoded_problem(data[: len(data) // 2]) == problem


def test_empty_files_text_and_gif_are_refused_with_a_reason() -> None:
    buffer = io.BytesIO()
    Image.fromarray(RGB8).save(buffer, "GIF")
    assert encoded_problem(b"") == "empty file"
    html = "not an image format DALI decodes (first bytes 3c68746d6c3e3430)"
    assert encoded_problem(b"<html>404</html>") == html
    assert encoded_problem(buffer.getvalue()) == "GIF, which DALI does not decode"
