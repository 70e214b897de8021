"""``train.compile_package``: the forward compiled ahead of time at the first step, trained through and kept
in the compile-cache file; a later run trains from the package without dynamo tracing, to the same weights."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from tests.conftest import tiny_config
from torch._dynamo.utils import counters

from retinaflow.engine import compile_cache, compile_package
from retinaflow.engine.checkpoint import load_checkpoint
from retinaflow.engine.compile_package import PackagedForward, PackageMismatch
from retinaflow.engine.train import train
from retinaflow.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's code cache outlives a test: later tests that count compiled graphs must not reuse these."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def config(paths, cache: str = "", package: bool = False, precision: str = "fp32"):
    """The tiny network on 8 padded shapes (symbolic block counts), dynamo's eager backend (inductor's CPU
    convolution backward specialises the sizes, so only a GPU gives a symbolic inductor package)."""
    cfg = tiny_config(paths, iters=4)
    cfg.data.resize, cfg.data.max_size, cfg.data.jitter = 96, 192, (64, 128)
    cfg.train.compile, cfg.train.compile_cache, cfg.train.compile_package = "eager", cache, package
    cfg.train.checkpoint_every, cfg.train.precision = 0, precision
    return cfg


# bf16: the step runs under autocast, which the package must be loaded under too (torch 2.11 refused every
# call of a package loaded outside it on the H200, docs/PERFORMANCE.md)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_second_run_trains_from_the_package_without_tracing_to_the_same_weights(
    synth_small, tmp_path, caplog, monkeypatch, precision
):
    loaded_under_autocast = []
    load = torch.compiler.load_compiled_function

    def spy(f):  # torch 2.14.1 on the CPU accepts a package loaded outside autocast: check the contract
        loaded_under_autocast.append(torch.is_autocast_enabled("cpu"))
        return load(f)

    monkeypatch.setattr(torch.compiler, "load_compiled_function", spy)
    plain = load_checkpoint(train(config(synth_small, precision=precision), tmp_path / "plain.pth"))["model"]
    cache = tmp_path / "compile.bin"
    compile_cache.write(cache, {"cpu package": b"another network's package"})  # not run: compiled again
    with caplog.at_level("INFO", logger="retinaflow"):
        first_path = train(config(synth_small, str(cache), True, precision), tmp_path / "first.pth")
    first = load_checkpoint(first_path)["model"]
    assert "compile package: cannot load cpu package (it was compiled for another network" in caplog.text
    # compiled at the first step, and every batch of the first run went through it
    assert "compile package: compiled in" in caplog.text
    assert "4 batches ran through it, 0 through the compiled network" in caplog.text
    assert compile_cache.load_package(cache, CPU) not in (None, b"another network's package")
    caplog.clear()
    frames = counters["frames"]["total"]
    assert frames > 0  # the runs without a package traced
    with caplog.at_level("INFO", logger="retinaflow"):
        second_path = train(config(synth_small, str(cache), True, precision), tmp_path / "second.pth")
    second = load_checkpoint(second_path)["model"]
    assert counters["frames"]["total"] == frames  # dynamo traced nothing
    assert "compile package: cpu package loaded" in caplog.text
    assert "outside its guards" not in caplog.text  # every batch ran through the package
    assert "4 batches ran through it, 0 through the compiled network" in caplog.text
    assert loaded_under_autocast == [precision == "bf16"]  # the saved one (the other is refused before)
    for name, weights in (("first", first), ("second", second)):
        for key, value in plain.items():
            assert torch.equal(weights[key], value), (name, key)


class _Net(torch.nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_a_package_runs_only_for_the_network_backend_precision_and_code_it_was_compiled_for(monkeypatch):
    """Its guards would refuse another network's parameters batch after batch, and would not see other
    code at all: the package runs the forward as it was traced."""
    net, x = _Net(4), torch.randn(2, 3, 16, 16)
    torch._dynamo.mark_dynamic(x, 2)
    mine = compile_package.fingerprint(net, "eager", None)
    blob = compile_package.serialize(compile_package.compile_forward(net, x, "eager", nullcontext()), mine)
    y = torch.randn(2, 3, 24, 16)
    assert torch.equal(compile_package.load(blob, mine, nullcontext())(net, y), net(y))
    others = [
        compile_package.fingerprint(_Net(6), "eager", None),
        compile_package.fingerprint(net, "inductor", None),
        compile_package.fingerprint(net, "eager", torch.bfloat16),
    ]
    monkeypatch.setattr(compile_package, "_source_digest", lambda: "retinaflow's code, edited")
    others.append(compile_package.fingerprint(net, "eager", None))
    assert len({mine, *others}) == 5
    for other in others:
        with pytest.raises(PackageMismatch, match="compiled for another network"):
            compile_package.load(blob, other, nullcontext())


def test_a_batch_the_package_refuses_runs_through_the_compiled_network():
    calls: list[str] = []

    def package(net, x):
        if x.shape[-1] > 4:
            raise RuntimeError("GuardManager check failed, reason: 5 <= L['args'][0].size()[2]")
        if x.shape[-1] == 4:
            raise RuntimeError("CUDA out of memory")
        calls.append("package")
        return x

    forward = PackagedForward(package, torch.nn.Identity(), lambda x: calls.append("fallback") or x)
    forward(torch.zeros(1, 3))
    forward(torch.zeros(1, 5))
    assert calls == ["package", "fallback"] and (forward.hits, forward.fallbacks) == (1, 1)
    with pytest.raises(RuntimeError, match="out of memory"):  # only the guards' refusal falls back
        forward(torch.zeros(1, 4))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"compile_cache": ""}, "add --compile --compile-cache FILE"),
        ({"compile_shapes": "static"}, "drop --cuda-graph or --compile-shapes static"),
    ],
)
def test_a_package_it_cannot_keep_is_refused_before_training(synth_small, tmp_path, changes, message):
    cfg = config(synth_small, str(tmp_path / "compile.bin"), True)
    for key, value in changes.items():
        setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=message):
        train(cfg, tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists()
