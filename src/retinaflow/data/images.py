"""Image files to what the model sees: (3, H, W) uint8 RGB, as labelling tools display the file.

Two rules, which every decoding path (this torch one, DALI) must follow:

- :func:`to_uint8`: samples wider than 8 bits (16-bit PNG) are scaled to 8 bits by keeping the high
  byte (``v >> 8``, as PIL and ``torchvision.transforms.v2.functional.to_dtype(scale=True)`` do), never
  truncated to the low byte.
- The EXIF orientation is applied (``decode_image(apply_exif_orientation=True)``,
  ``PIL.ImageOps.exif_transpose``): COCO ``width``/``height`` and boxes describe the displayed image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; PIL does the job where it is gone
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_image = None


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """``image`` with 8-bit samples: uint8 as is; uint16 (and other wider integers, read as 16-bit)
    keep their high byte, so 65535 -> 255 and 32768 -> 128."""
    if image.dtype == torch.uint8:
        return image
    return (image.to(torch.int32) >> 8).clamp(0, 255).to(torch.uint8)


def decode_file(path: str | Path) -> torch.Tensor:
    """The image at ``path`` as (3, H, W) uint8 RGB, EXIF orientation applied.

    torchvision decodes what it can (JPEG, PNG incl. 16-bit, WEBP, GIF); PIL the rest (BMP, TIFF...).
    Raises whatever the decoders raise for unreadable files (callers treat any exception as corrupt).
    """
    if decode_image is not None:
        try:
            data = read_file(str(path))
            return to_uint8(decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True))
        except (RuntimeError, OSError, ValueError):
            pass  # formats or variants torchvision does not read: try PIL
    with Image.open(path) as im:
        array = pil_rgb(ImageOps.exif_transpose(im))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def pil_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image; 16-bit greyscale (``I;16``) scaled by :func:`to_uint8`
    (PIL's own ``convert("RGB")`` clips it to white)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = to_uint8(torch.from_numpy(np.asarray(im).astype(np.int32)))
        return np.repeat(grey.numpy()[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB")).copy()


def displayed_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` as displayed (EXIF orientation applied), read from the
    header only."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# The formats DALI's image decoder reads, by their first bytes (WebP and PNM are checked apart).
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
)
_TAIL = 65536  # where a complete file's end marker must be: trailing bytes after it are common, not this many


def encoded_problem(data: bytes) -> str | None:
    """Why ``data``, a whole image file, is not a complete image in a format DALI decodes; None if it
    looks fine. Structure only, no decoding (microseconds an image): an empty file, a format DALI does not
    read (GIF: use ``--loader torch``), a JPEG without its end-of-image marker or a PNG without its IEND
    chunk in the last 64 KiB (a truncated file: cut-off downloads and copies are the usual corruption).
    What passes may still fail to decode; the DALI loaders find those by decoding on the CPU."""
    if not data:
        return "empty file"
    kind = next((name for sig, name in _SIGNATURES if data.startswith(sig)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WebP"
    if kind is None and len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456":
        kind = "PNM"
    if kind is None:
        if data[:4] == b"GIF8":
            return "GIF, which DALI does not decode"
        return f"not an image format DALI decodes (first bytes {data[:8].hex()})"
    start = max(0, len(data) - _TAIL)
    if kind == "JPEG" and data.rfind(b"\xff\xd9", start) < 0:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "PNG" and data.rfind(b"IEND", start) < 0:
        return "truncated PNG (no IEND chunk)"
    return None
