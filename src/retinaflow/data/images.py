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
