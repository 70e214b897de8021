"""RetinaNet assembled from injected parts: backbone -> FPN -> shared head.

``forward`` returns the raw head outputs per level; anchors (``anchors.generate_anchors``), the loss
(``loss.detection_loss``) and post-processing (``retinaflow.ops.boxes``) live outside the module, so the
network traces and exports to ONNX without data-dependent control flow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retinaflow.config import AnchorConfig, ModelConfig
from retinaflow.errors import ConfigError, DataError
from retinaflow.model.backbones import build_backbone
from retinaflow.model.fpn import FPN
from retinaflow.model.head import MergedHead, RetinaNetHead, UnsharedHead, unshare_level_norms
from retinaflow.model.norm import fold_batchnorm, resolve_norms
from retinaflow.ops._reference import flatten_level

# ImageNet statistics in 0..255 RGB.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def flatten_outputs(cls: list[torch.Tensor], box: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-level head outputs in anchor order.

    cls: per level (B, A*C, H_l, W_l); box: per level (B, A*4, H_l, W_l).
    Returns (B, N, C) and (B, N, 4), N = sum_l H_l*W_l*A, location-major (y, then x), anchor-minor: the
    order of ``generate_anchors`` and of torchvision's RetinaNet.
    """
    a = box[0].shape[1] // 4
    return torch.cat([flatten_level(x, a) for x in cls], 1), torch.cat([flatten_level(x, a) for x in box], 1)


class RetinaNet(nn.Module):
    """The detector network.

    backbone: module mapping normalised (B, 3, H, W) to [C3, C4, C5] (strides 8, 16, 32).
    fpn:      module mapping [C3, C4, C5] to [P3..P7].
    head:     module mapping [P3..P7] to (cls list, box list); has ``num_classes`` and ``num_anchors``.
    anchors:  the anchor settings the head was built for (strides must match the pyramid).
    arch:     plain description stored in checkpoints and compared when resuming.

    forward(images: (B, 3, H, W) float or uint8, RGB 0..255, H and W multiples of 128) ->
        (cls: list of (B, A*C, H_l, W_l), box: list of (B, A*4, H_l, W_l)), raw outputs for P3..P7.
    """

    pixel_scale: torch.Tensor
    pixel_shift: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        fpn: nn.Module,
        head: RetinaNetHead,
        anchors: AnchorConfig,
        arch: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        # UnsharedHead, MergedHead: inference forms (fold_for_inference; export.aoti)
        self.head: RetinaNetHead | UnsharedHead | MergedHead = head
        self.anchor_config = anchors
        self.arch: dict[str, Any] = arch if arch is not None else {}
        # (x - mean) / std folded into x * scale + shift; not saved in state dicts.
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / std, persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)
        self.pad_channels = 0  # zero channels normalize appends (pad_stem_input)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def num_anchors(self) -> int:
        return self.head.num_anchors

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.anchor_config.strides)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8/float 0..255 RGB -> float ImageNet-normalised (B, 3 + pad_channels, H, W),
        the padding channels zero; memory format preserved."""
        if not torch.jit.is_tracing() and (images.dim() != 4 or images.shape[1] != 3):
            raise DataError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.pixel_scale.dtype) if not images.is_floating_point() else images
        x = x * self.pixel_scale + self.pixel_shift
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.pad_channels)) if self.pad_channels else x

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = self.fpn(self.backbone(self.normalize(images)))
        return self.head(features)


def fold_for_inference(model: RetinaNet) -> RetinaNet:
    """In place, for a model that will never train again: eval mode, every fixed BatchNorm folded into the
    convolution before it (:func:`~retinaflow.model.norm.fold_batchnorm`) and a per-level BatchNorm head
    (``model.head_norm=bn``) replaced by its folded :class:`~retinaflow.model.head.UnsharedHead`; GroupNorm
    layers stay as they are. The state dict no longer loads checkpoints. Returns ``model``."""
    model.eval()
    fold_batchnorm(model)
    if not isinstance(model.head, MergedHead):
        model.head = unshare_level_norms(model.head)
    return model


@torch.no_grad()
def pad_stem_input(model: RetinaNet, channels: int) -> RetinaNet:
    """In place, for inference: the backbone's first convolution (the one that reads the image) takes
    ``channels`` input channels, the image's 3 then zeros that ``normalize`` appends, its weights for them
    zero: the same outputs. cuDNN's fast NHWC fp16 kernels for a 7x7 stem read 4 channels and pad a
    3-channel input in a kernel of its own (``nhwcAddPaddingKernel``); padded in ``normalize``, the zeros
    are written by the pre-processing kernel. ``channels`` 3 leaves the model as it is. Returns ``model``."""
    if channels == 3:
        return model
    if channels < 3:
        raise ValueError(f"pad_stem_input pads the stem's 3 input channels to more, not to {channels}")
    stems = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3]
    if len(stems) != 1 or model.pad_channels:
        raise ValueError(f"pad_stem_input needs one 3-channel convolution in the backbone, has {len(stems)}")
    stem = stems[0]
    w = stem.weight
    zeros = w.new_zeros(w.shape[0], channels - 3, *w.shape[2:])
    stem.weight = nn.Parameter(torch.cat([w, zeros], 1), requires_grad=False)
    stem.in_channels, model.pad_channels = channels, channels - 3
    return model


def model_arch(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture fields of ``cfg`` as plain values (what checkpoints store and compare).

    ``norm`` / ``head_norm`` appear only when they differ from the ODTK network (frozen_bn, none), so
    checkpoints written before those options describe the same architecture. ``cfg.norm`` is concrete.
    """
    extra = {
        k: v for k, v in (("norm", cfg.norm), ("head_norm", cfg.head_norm)) if v not in ("frozen_bn", "none")
    }
    return {
        "backbone": cfg.backbone,
        "num_classes": int(cfg.num_classes),
        "fpn_channels": int(cfg.fpn_channels),
        "head_convs": int(cfg.head_convs),
        "anchors": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg.anchors).items()
        },
        **extra,
    }


def build_model(cfg: ModelConfig, backbone_weights: str | Path | None = None) -> RetinaNet:
    """Build the RetinaNet that ``cfg`` describes.

    backbone_weights: None, a local torchvision classification ``.pth``, or ``"offline"`` (see
    ``backbones.build_backbone``). ``auto`` norms build the ODTK network (frozen_bn, no head norm): only
    the trainer knows that a run starts from random init, and resolves them to gn before calling this.
    Raises ConfigError for settings the network cannot honour.
    """
    cfg = resolve_norms(cfg, pretrained=True)
    if tuple(cfg.anchors.strides) != FPN.strides:
        raise ConfigError(
            f"model.anchors.strides must be {list(FPN.strides)} (P3-P7), got {list(cfg.anchors.strides)}"
        )
    if cfg.fpn_channels < 1:
        raise ConfigError(f"model.fpn_channels must be positive, got {cfg.fpn_channels}")
    backbone = build_backbone(cfg.backbone, weights=backbone_weights, norm=cfg.norm)
    fpn = FPN(backbone.out_channels, cfg.fpn_channels)
    head = RetinaNetHead(
        cfg.fpn_channels, cfg.anchors.num_anchors, cfg.num_classes, cfg.head_convs, cfg.prior, cfg.head_norm
    )
    return RetinaNet(backbone, fpn, head, cfg.anchors, arch=model_arch(cfg))
