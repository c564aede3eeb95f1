"""The inference copy split at the target layer (camlens.accelerate.SplitForward, compile=True).

The part before the layer runs compiled without gradients, the rest eagerly from the layer's
output. Checked against the plain computation (the model itself): maps, scores, channel weights
and gradients equal to 1e-5; where the graph cannot be cut or the cut does not agree, the copy
runs whole. Most tests let torch.compile stand in as the identity (the cut is under test);
one compiles for real.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.accelerate import PlainForward, SplitForward, inference_copy
from camlens.capture import preserved
from camlens.evaluate import evaluate_image


class Crossing(nn.Module):
    """Values cross the cut besides the layer's output: a skip connection from below the layer,
    the input itself, and a parameter read in the container's own forward on both sides."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.features = nn.ReLU()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))
        self.head = nn.Linear(6 + 3, classes)

    def forward(self, x):
        skip = self.stem_bn(self.stem(x)) * self.gain
        y = self.features(self.body(skip) + skip)
        y = y * self.gain + skip  # the skip and the parameter, again after the cut
        pooled = torch.cat([F.adaptive_avg_pool2d(y, 1).flatten(1), x.mean((2, 3))], 1)
        return self.head(pooled)


class Branchy(nn.Module):
    """A container whose forward branches on its input's values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.features = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.features(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return self.head(y.mean((2, 3)))


class Twice(nn.Module):
    """The target layer runs twice in one forward pass: there is no single place to cut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.features = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(self.features(self.conv(x)) - 0.1).mean((2, 3)))


def crossing(seed: int = 0) -> Crossing:
    torch.manual_seed(seed)
    model = Crossing()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def identity_compile(monkeypatch):
    """torch.compile stands in as the identity: what is tested is the cut around it."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.randn(3, 3, 10, 10)


def runner_of(method, images):
    runner, _ = method._runners(method._prepare(images), list(method._layers))
    return runner


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "smoothgradcam++", "scorecam"])
def test_every_method_through_the_cut_equals_the_model_itself(name, x, identity_compile):
    """(CAM needs pooling and one linear layer after its layer: test_cam_through_the_cut.)"""
    model = crossing()
    extra = {"seed": 0, "n_samples": 4} if name == "smoothgradcam++" else {}
    fast = camlens.explain(model, x, name, "features", compile=True, **extra)
    plain = camlens.explain(model, x, name, "features", **extra)
    assert (fast.maps - plain.maps).abs().max() <= 1e-5
    assert torch.allclose(fast.scores, plain.scores, atol=1e-5)
    assert torch.allclose(fast.weights["features"], plain.weights["features"], atol=1e-5, rtol=1e-4)
    method = camlens.GradCAM(model, "features", compile=True)
    assert isinstance(runner_of(method, x), SplitForward)


def test_cam_through_the_cut(x, identity_compile):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)
    ).eval()
    fast = camlens.CAM(model, "2", compile=True)
    assert isinstance(runner_of(fast, x), SplitForward)
    assert (fast(x).maps - camlens.CAM(model, "2")(x).maps).abs().max() <= 1e-5


def test_the_gradient_is_the_models_own(x, identity_compile):
    """dS/dA through the eager part after the cut equals autograd through the whole model."""
    model = crossing()
    inference = inference_copy(model, x)
    split = SplitForward.make(inference, "features")
    seen = {}
    handle = split.tap.register_forward_hook(
        lambda module, args, out: seen.setdefault("a", out.detach().requires_grad_(True))
    )
    try:
        with torch.enable_grad():
            logits = split(x)
    finally:
        handle.remove()
    grad_split, = torch.autograd.grad(logits[:, 2].sum(), seen["a"])

    store = {}
    def keep(module, args, out):
        out = out.detach().requires_grad_(True)
        store["a"] = out
        return out

    with preserved(model):
        handle = model.features.register_forward_hook(keep)
        try:
            grad_model, = torch.autograd.grad(model(x)[:, 2].sum(), store["a"])
        finally:
            handle.remove()
    assert torch.allclose(grad_split, grad_model, atol=1e-6)
    assert torch.allclose(seen["a"], store["a"], atol=1e-6)


def test_the_part_before_the_cut_records_no_graph(x, identity_compile):
    model = crossing()
    split = SplitForward.make(inference_copy(model, x), "features")
    outputs = []
    handle = split.tap.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        with torch.enable_grad():
            split(x)
    finally:
        handle.remove()
    assert outputs[0].grad_fn is None and not outputs[0].requires_grad


def test_the_cut_passes_what_crosses_it(x, identity_compile):
    """The layer's output first, then the skip connection and the input (the parameter read on
    both sides is copied into the part after the cut, not passed)."""
    split = SplitForward.make(inference_copy(crossing(), x), "features")
    crossing_values = [node for node in split.after.graph.nodes if node.op == "placeholder"]
    assert len(crossing_values) == 3
    assert any(node.op == "get_attr" and node.target == "gain" for node in split.after.graph.nodes)


@pytest.mark.parametrize("model_class", [Branchy, Twice])
def test_models_that_cannot_be_cut_run_the_copy_whole(model_class, x, identity_compile):
    torch.manual_seed(0)
    model = model_class().eval()
    assert SplitForward.make(inference_copy(model, x), "features") is None
    method = camlens.GradCAM(model, "features", compile=True)
    if model_class is Twice:  # a layer that runs twice is refused anyway
        with pytest.raises(camlens.CamlensError, match="more than once"):
            method(x)
        return
    assert isinstance(runner_of(method, x), PlainForward)
    assert (method(x).maps - camlens.GradCAM(model, "features")(x).maps).abs().max() <= 1e-5


def test_a_cut_that_does_not_agree_is_not_used(x, identity_compile, monkeypatch):
    model = crossing()
    method = camlens.GradCAM(model, "features", compile=True)
    plain = camlens.GradCAM(model, "features")(x)
    original = SplitForward.make

    class OffByOne(nn.Module):
        def __init__(self, after):
            super().__init__()
            self.inner = after

        def forward(self, *values):
            return self.inner(*values) + 1.0  # the logits no longer agree

    def wrong(inference, layer):
        split = original(inference, layer)
        split.after = OffByOne(split.after)
        return split

    monkeypatch.setattr(SplitForward, "make", staticmethod(wrong))
    assert isinstance(runner_of(method, x), PlainForward)
    assert (method(x).maps - plain.maps).abs().max() <= 1e-5


def test_several_layers_or_another_unit_layer_run_the_copy_whole(x, identity_compile):
    model = crossing()
    method = camlens.GradCAM(model, ["features", "body.2"], compile=True)
    runner, _ = method._runners(x, ["features", "body.2"])
    assert isinstance(runner, PlainForward)
    fused = method(x)
    assert (fused.maps - camlens.GradCAM(model, ["features", "body.2"])(x).maps).abs().max() <= 1e-5


def test_a_unit_target_at_the_layer_itself_goes_through_the_cut(x, identity_compile):
    model = crossing()
    target = camlens.UnitTarget("features", channel=2, position=(4, 5))
    fast = camlens.explain(model, x, "smoothgradcam++", "features", target, compile=True, seed=0, n_samples=3)
    plain = camlens.explain(model, x, "smoothgradcam++", "features", target, seed=0, n_samples=3)
    assert (fast.maps - plain.maps).abs().max() <= 1e-5
    assert torch.allclose(fast.scores, plain.scores, atol=1e-6)


def test_batch_equals_one_by_one_through_the_cut(x, identity_compile):
    model = crossing()
    method = camlens.GradCAMPlusPlus(model, "features", compile=True)
    batched = method(x)
    for row in range(x.shape[0]):
        single = method(x[row : row + 1])
        assert (single.maps[0] - batched.maps[row]).abs().max() <= 1e-5


def test_compiled_for_real_the_cut_gives_the_plain_maps(tmp_path, monkeypatch):
    """A real torch.compile (inductor) of the part before the cut, at two batch sizes, and the
    metrics that run through it (evaluate's Grad-CAM)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = crossing()
    torch.manual_seed(5)
    images = torch.randn(2, 3, 10, 10)
    fast = camlens.GradCAM(model, "features", compile=True)
    assert isinstance(runner_of(fast, images), SplitForward)
    for batch in (images, images[:1]):
        assert (fast(batch).maps - camlens.GradCAM(model, "features")(batch).maps).abs().max() <= 1e-5
    metrics = ["drop", "increase", "deletion", "insertion"]
    compiled = evaluate_image(fast, images[0], 1, [], metrics, steps=4, batch_size=2)
    slow = evaluate_image(camlens.GradCAM(model, "features"), images[0], 1, [], metrics, steps=4, batch_size=2)
    assert compiled["drop"] == pytest.approx(slow["drop"], abs=1e-5)
    assert compiled["deletion_curve"] == pytest.approx(slow["deletion_curve"], abs=1e-5)
