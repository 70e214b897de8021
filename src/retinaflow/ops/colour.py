"""Colour jitter of a padded uint8 batch as ``torch.ops.retinaflow.colour_jitter``.

The DALI loader's last step: torchvision's brightness → contrast → saturation, each image with its own
factors and its own pixels (the padding stays zero). On the GPU the kernel (``kernels/colour.cu``) does it
in two passes over uint8 data: exact per-image grey sums, then one elementwise pass. As a chain of PyTorch
ops it was ~20 float32 passes over the batch, which held the DALI loader at half its speed without jitter.
CPU tensors run the PyTorch reference (:func:`retinaflow.ops._reference.colour_jitter`).
"""

from __future__ import annotations

import torch

from retinaflow.ops import _ext

__all__ = ["colour_jitter"]


def colour_jitter(images: torch.Tensor, sizes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, H, W) uint8 RGB, image i in its top-left ``sizes[i]`` = (h, w) corner, zeros elsewhere;
    sizes: (B, 2) int (host or device); factors: (B, 3) float (brightness, contrast, saturation).
    Returns (B, 3, H, W) uint8 channels_last on ``images``' device, the padding still zero."""
    _ext.ensure_loaded_for(images)
    sizes, factors = _to(sizes, torch.int64, images.device), _to(factors, torch.float32, images.device)
    return torch.ops.retinaflow.colour_jitter(images, sizes, factors)


def _to(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` as ``dtype`` on ``device``; from the host through pinned memory, so the copy does not wait for
    the GPU's queue (a pageable copy would: one host sync per batch)."""
    t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
