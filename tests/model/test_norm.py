from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import misc

from retinaflow.config import ModelConfig
from retinaflow.model.backbones import available_backbones, build_backbone
from retinaflow.model.norm import FrozenBatchNorm2d, fold_batchnorm
from retinaflow.model.retinanet import build_model


def _randomise_statistics(module: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics and affine, so a wrong fold cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (misc.FrozenBatchNorm2d, nn.BatchNorm2d)):
            c = m.weight.shape[0]
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)  # type: ignore[operator]
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))  # type: ignore[operator]


def _frozen_pair(channels: int = 6) -> tuple[FrozenBatchNorm2d, misc.FrozenBatchNorm2d]:
    ours, ref = FrozenBatchNorm2d(channels), misc.FrozenBatchNorm2d(channels)
    _randomise_statistics(ours)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_frozen_bn_matches_torchvision_values_and_gradients() -> None:
    ours, ref = _frozen_pair()
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_bn_keeps_the_activation_dtype_and_layout(dtype: torch.dtype) -> None:
    ours, ref = _frozen_pair()
    x = torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    assert ref(x).dtype == torch.float32  # torchvision's promotes half activations to float32
    out = ours(x)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), ref(x), atol=2e-2, rtol=2e-2)


def test_frozen_bn_state_dict_is_torchvisions() -> None:
    ours, ref = _frozen_pair()
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("name", available_backbones())
def test_fold_preserves_every_registered_backbone(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name).eval().double()  # float64: any error is a wrong fold, not rounding
    _randomise_statistics(backbone)
    norms = sum(isinstance(m, misc.FrozenBatchNorm2d) for m in backbone.modules())
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = backbone(x)
        assert fold_batchnorm(backbone) == norms > 0
        folded = backbone(x)
    assert not any(isinstance(m, misc.FrozenBatchNorm2d) for m in backbone.modules())
    for a, b in zip(folded, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_fold_preserves_the_detector_outputs() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", num_classes=3, fpn_channels=32, head_convs=1))
    model.eval()
    _randomise_statistics(model)
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        cls, box = model(images)
        fold_batchnorm(model)
        cls_f, box_f = model(images)
    for a, b in zip(cls_f + box_f, cls + box, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fold_skips_batchnorm_in_training_mode_and_folds_it_in_eval() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    _randomise_statistics(net)
    assert fold_batchnorm(net) == 0
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        assert fold_batchnorm(net) == 1
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(net[1], nn.Identity) and net[0].bias is not None


def test_fold_leaves_a_bn_that_does_not_follow_a_conv() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), FrozenBatchNorm2d(4))
    assert fold_batchnorm(net) == 0
    assert isinstance(net[2], FrozenBatchNorm2d)
