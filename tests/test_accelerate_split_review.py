"""Review of the inference copy cut at the target layer (camlens.accelerate.SplitForward,
compile=True, commit 10a958a): cases where the cut gave other maps, weights or gradients than
the plain computation (the model itself), compiled more than it needs, or failed where the
model works; and checks of what held (state restored, copies freed, tied parameters).

torch.compile stands in as the identity in most tests (what is under test is the cut around
it); one test counts dynamo's compilations with its counting backend (no inductor).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import camlens
import camlens.accelerate as accelerate
from camlens.accelerate import PlainForward, SplitForward
from conftest import make_tiny


@pytest.fixture
def identity_compile(monkeypatch):
    """torch.compile stands in as the identity: what is tested is the cut around it."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.randn(3, 3, 8, 8)


def runner_of(method, images):
    runner, _ = method._runners(method._prepare(images), list(method._layers))
    return runner


def differences(model, images, method="gradcam", layer="features", **options):
    """Largest differences of the maps, weights and scores with the cut against the model."""
    fast = camlens.explain(model, images, method, layer, compile=True, **options)
    plain = camlens.explain(model, images, method, layer, **options)
    return (
        float((fast.maps - plain.maps).abs().max()),
        float((fast.weights[layer] - plain.weights[layer]).abs().max()),
        float((fast.scores - plain.scores).abs().max()),
    )


class Small(nn.Module):
    """conv -> features (the target layer) -> what ``after`` does -> head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.features = nn.ReLU()
        self.head = nn.Linear(4, 3)


class NoGradAfter(Small):
    """A baseline computed under no_grad after the layer: autograd must not see through it.
    torch.fx does not record grad mode, so the traced part after the cut differentiated it."""

    def forward(self, x):
        f = self.features(self.conv(x))
        with torch.no_grad():
            baseline = f.mean((2, 3)).sum(1, keepdim=True)
        return self.head(f.mean((2, 3))) * baseline


class RoundThrough(torch.autograd.Function):
    """Rounding with a straight-through gradient (quantisation-aware models)."""

    @staticmethod
    def forward(ctx, values):
        return values.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


class CustomFunctionAfter(Small):
    """A custom autograd.Function after the layer: torch.fx traces into its forward and loses
    its backward (round's gradient is 0: every Grad-CAM weight became 0)."""

    def forward(self, x):
        return self.head(RoundThrough.apply(self.features(self.conv(x)) * 3).mean((2, 3)))


class InPlaceBefore(Small):
    """``a.mul_(2)`` before the layer: its node is not an ancestor of the layer in the graph
    (the layer's input is the node of ``a``), so the cut moved it after the layer, and the layer
    saw ``a`` unscaled. The head is scale-free, so the logits still agreed."""

    def forward(self, x):
        a = self.conv(x)
        a.mul_(2)
        pooled = self.features(a).mean((2, 3))
        return self.head(pooled / pooled.norm(dim=1, keepdim=True))


class ScaleFree(Small):
    def forward(self, x):
        pooled = self.features(self.conv(x)).mean((2, 3))
        return self.head(pooled / pooled.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("model_class", [NoGradAfter, CustomFunctionAfter])
@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "smoothgradcam++"])
def test_the_backward_after_the_cut_is_the_models_own(model_class, name, x, identity_compile):
    """The split was verified on forward values only; its gradients were never compared."""
    extra = {"seed": 0, "n_samples": 3} if name == "smoothgradcam++" else {}
    maps, weights, scores = differences(model_class().eval(), x, name, **extra)
    assert maps <= 1e-5 and weights <= 1e-5 and scores <= 1e-5


def test_an_in_place_update_before_the_layer_stays_before_the_cut(x, identity_compile):
    """The part before the cut is everything the forward runs before the layer, in its order."""
    model = InPlaceBefore().eval()
    assert isinstance(runner_of(camlens.GradCAM(model, "features", compile=True), x), SplitForward)
    maps, weights, scores = differences(model, x)
    assert maps <= 1e-5 and weights <= 1e-5 and scores <= 1e-5


def test_the_layer_output_is_checked_against_the_copy_itself(x, identity_compile, monkeypatch):
    """The verification hooked the copy's layer while it ran the split too, whose ``before``
    calls that same module: the 'expected' layer output was overwritten by the split's own, so
    a cut feeding the layer a wrong input passed whenever the logits agreed (here a scale-free
    head: the weights came out halved)."""

    class WrongBefore(nn.Module):
        def __init__(self, copy):
            super().__init__()
            self.copy = copy

        def forward(self, inputs):
            return (self.copy.features(2 * self.copy.conv(inputs)),)

    class After(nn.Module):
        def __init__(self, copy):
            super().__init__()
            self.copy = copy

        def forward(self, given):
            pooled = given.mean((2, 3))
            return self.copy.head(pooled / pooled.norm(dim=1, keepdim=True))

    monkeypatch.setattr(accelerate, "cut", lambda module, layer: (WrongBefore(module), After(module)))
    model = ScaleFree().eval()
    assert isinstance(runner_of(camlens.GradCAM(model, "features", compile=True), x), PlainForward)
    maps, weights, scores = differences(model, x)
    assert maps <= 1e-5 and weights <= 1e-5 and scores <= 1e-5


def test_the_part_before_the_layer_is_compiled_once_per_batch_size(x, monkeypatch):
    """The verification ran the compiled part with a hook on the layer inside it, so dynamo
    compiled it once with the hook and again for the first real call (a second compilation of
    up to a minute on a real model). dynamo's counting backend: no inductor."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compile_(module, backend=counter))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    method = camlens.GradCAM(model, "2", compile=True)
    plain = camlens.GradCAM(model, "2")
    try:
        for batch, compiled in ((x[:1], 1), (x[:1], 1), (x, 2), (x[:1], 2)):
            assert (method(batch).maps - plain(batch).maps).abs().max() <= 1e-5
            assert counter.frame_count == compiled
    finally:
        torch._dynamo.reset()


def test_a_compilation_that_fails_at_another_batch_size_runs_that_part_eagerly(x, monkeypatch):
    """Verified at one image, the compiled part may still fail at another batch size (an
    inductor error on one shape): the part runs eagerly, as in the copy, instead of failing."""

    def compile_failing_beyond_one(module, **kwargs):
        def compiled(inputs):
            if inputs.shape[0] != 1:
                raise RuntimeError("simulated compiler failure at this shape")
            return module(inputs)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_failing_beyond_one)
    model = make_tiny(dtype=torch.float32)
    method = camlens.GradCAM(model, "features", compile=True)
    assert isinstance(runner_of(method, x[:1]), SplitForward)
    assert (method(x).maps - camlens.GradCAM(model, "features")(x).maps).abs().max() <= 1e-5


def test_a_model_with_lazy_parameters_gets_a_camlens_error(x):
    """preserved() called requires_grad_ on an uninitialised parameter: a ValueError traceback."""
    model = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(3))
    for options in ({}, {"compile": True}):
        with pytest.raises(camlens.CamlensError, match="lazy"):
            camlens.explain(model.eval(), x, "gradcam", "1", **options)


# -- what held ------------------------------------------------------------------------------


class Block(nn.Module):
    """A residual block: the target layer is a container with a skip connection around it, its
    output used twice after the cut, an in-place ReLU right after it, a buffer read in the
    container's forward, dropout and batch norm (train mode outside the explanation)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 4)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                with torch.no_grad():
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        a = self.stem(x)
        b = self.block(a)
        y = self.act(b) * self.scale + b + a
        return self.head(self.drop(y.mean((2, 3))))


@pytest.mark.parametrize("layer", ["block", "block.1", "stem", "stem.2"])
@pytest.mark.parametrize("name", ["gradcam", "smoothgradcam++", "scorecam"])
def test_held_a_residual_block_through_the_cut(layer, name, x, identity_compile):
    model = Block().train()
    extra = {"seed": 0, "n_samples": 3} if name == "smoothgradcam++" else {}
    modes = [module.training for module in model.modules()]
    fast = camlens.explain(model, x, name, layer, compile=True, **extra)
    assert [module.training for module in model.modules()] == modes
    assert all(parameter.requires_grad for parameter in model.parameters())
    plain = camlens.explain(model, x, name, layer, **extra)
    assert (fast.maps - plain.maps).abs().max() <= 1e-5
    assert torch.allclose(fast.weights[layer], plain.weights[layer], atol=1e-5)
    assert isinstance(runner_of(camlens.GradCAM(model, layer, compile=True), x), SplitForward)


@pytest.mark.parametrize("unit_layer", ["block", "act"])
def test_held_unit_targets_at_and_after_the_layer(unit_layer, x, identity_compile):
    """At the layer the cut runs; at a later layer the copy runs whole."""
    model = Block().eval()
    target = camlens.UnitTarget(unit_layer, channel=1, position=(2, 3))
    method = camlens.SmoothGradCAMPlusPlus(model, "block", compile=True, seed=0, n_samples=3)
    runner, _ = method._runners(method._prepare(x), ["block", unit_layer])
    assert isinstance(runner, SplitForward if unit_layer == "block" else PlainForward)
    fast = method(x, target)
    plain = camlens.SmoothGradCAMPlusPlus(model, "block", seed=0, n_samples=3)(x, target)
    assert (fast.maps - plain.maps).abs().max() <= 1e-5


def test_held_a_changed_model_is_cut_again(x, identity_compile):
    """Parameters updated in place, replaced, and modules replaced: a new copy, a new cut."""
    model = Block().eval()
    method = camlens.GradCAM(model, "block", compile=True)
    changes = [
        lambda: model.block[0].weight.data.__imul__(1),  # no-op through .data: nothing to see
        lambda: torch.no_grad()(model.block[0].weight.mul_)(-1),
        lambda: setattr(model.block, "0", nn.Conv2d(6, 6, 3, padding=1)),
        lambda: setattr(model.block[1], "weight", nn.Parameter(torch.rand(6))),
        lambda: model.load_state_dict(Block().state_dict()),
    ]
    for change in changes:
        change()
        for batch in (x, x[:1], x[:2]):
            assert (method(batch).maps - camlens.GradCAM(model, "block")(batch).maps).abs().max() <= 1e-5


def test_held_tied_parameters_are_restored(x, identity_compile):
    """One parameter in two modules, frozen by the user: preserved() walks it twice."""
    model = Block().train()
    model.block[1].weight = model.stem[1].weight  # both batch norms scale by one parameter
    model.head.weight.requires_grad_(False)
    flags = [(name, parameter.requires_grad) for name, parameter in model.named_parameters(remove_duplicate=False)]
    camlens.explain(model, x, "gradcam", "block", compile=True)
    assert [(name, p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)] == flags
    assert all(module.training for module in model.modules())


def test_held_the_model_and_its_copies_are_freed_with_the_method(x, identity_compile):
    model = Block().eval()
    method = camlens.GradCAMPlusPlus(model, "block", compile=True)
    method(x)
    split = runner_of(method, x)
    assert isinstance(split, SplitForward)
    alive = [weakref.ref(obj) for obj in (model, split, split.copy, split.before, split.after)]
    del method, split, model
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_compiled_for_real_an_in_place_update_before_the_layer(x, tmp_path, monkeypatch):
    """Inductor compiles the part before the cut with the in-place update in it (two batch
    sizes): the maps and weights are the model's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = InPlaceBefore().eval()
    method = camlens.GradCAM(model, "features", compile=True)
    assert isinstance(runner_of(method, x), SplitForward)
    for batch in (x, x[:1]):
        fast, plain = method(batch), camlens.GradCAM(model, "features")(batch)
        assert (fast.maps - plain.maps).abs().max() <= 1e-5
        assert torch.allclose(fast.weights["features"], plain.weights["features"], atol=1e-6)
