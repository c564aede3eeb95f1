"""gradcam++-general: Grad-CAM++ with the true diagonal second and third derivatives of the score.

The references here are independent of the method's forward-mode engine: reverse-mode autograd
differentiated element by element (a plain loop), central finite differences, and the closed
form of Grad-CAM++ where the score is the exponential of a linear function of the activations.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import make_tiny
from torch import nn

import camlens
from camlens import CamlensError
from camlens.accelerate import cut
from camlens.methods.gradcampp_general import GradCAMPlusPlusGeneral, diagonal_derivatives


class CurvedHead(nn.Module):
    """features (conv + ReLU) -> conv + softplus -> global average pool -> linear: a head that is
    not linear in the target layer, so every derivative order matters."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.features = nn.ReLU()
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)
        self.skip = skip
        with torch.no_grad():  # larger weights: a strongly curved score, large higher derivatives
            self.conv.weight.mul_(4)
            self.fc.weight.mul_(4)
        self.double().eval()

    def head(self, a: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        if self.skip:  # the part after the layer also needs a tensor from below it
            a = a + below
        return self.fc(self.pool(nn.functional.softplus(self.conv(a))).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        below = self.stem(x)
        return self.head(self.features(below), below)


class Doubled(torch.autograd.Function):
    """2x with forward and reverse rules but no vmap rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return 2 * tangent


class ReverseOnly(Doubled):
    """2x with a reverse rule only."""

    generate_vmap_rule = True
    jvp = torch.autograd.Function.jvp


class Untraceable(CurvedHead):
    """The same network with a Python branch on a tensor value below the layer (torch.fx cannot
    trace it) and, after it, ``"plain"`` nothing more, ``"no-vmap"`` an autograd.Function without
    a vmap rule (the method then takes one direction at a time), ``"no-forward-ad"`` one without a
    forward-mode rule."""

    def __init__(self, after: str = "plain") -> None:
        super().__init__()
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        below = self.stem(x) if bool(x.abs().sum() >= 0) else -self.stem(x)
        a = self.features(below)
        if self.after == "no-vmap":
            a = Doubled.apply(a) / 2
        elif self.after == "no-forward-ad":
            a = ReverseOnly.apply(a) / 2
        return self.head(a, below)


class FlatMean(nn.Module):
    """GAP + linear written as flatten + mean: linear in the layer, but not a spatial mean the
    method recognises on the graph, so it takes every position as its own direction."""

    def __init__(self) -> None:
        super().__init__()
        tiny = make_tiny()
        self.features, self.fc = tiny.features, tiny.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(2).mean(-1))


def score_of(logits: torch.Tensor, classes: list[int], kind: str) -> torch.Tensor:
    values = {"logit": logits, "probability": logits.softmax(1), "exp": logits.exp()}[kind]
    return values[0, classes]


def reference_derivatives(model: CurvedHead, x: torch.Tensor, classes, kind: str):
    """d1, d2, d3 (N, T, K, h, w) by reverse-mode autograd, one image, target and element at a time."""
    with torch.no_grad():
        below = model.stem(x)
        a = model.features(below)
    count, channels, height, width = a.shape
    out = [torch.zeros(count, len(classes[0]), channels, height, width, dtype=a.dtype) for _ in range(3)]
    for n in range(count):
        for t in range(len(classes[0])):
            leaf = a[n : n + 1].clone().requires_grad_()
            y = score_of(model.head(leaf, below[n : n + 1]), classes[n], kind)[t]
            (g1,) = torch.autograd.grad(y, leaf, create_graph=True)
            out[0][n, t] = g1[0].detach()
            for k in range(channels):
                for i in range(height):
                    for j in range(width):
                        (g2,) = torch.autograd.grad(g1[0, k, i, j], leaf, create_graph=True)
                        (g3,) = torch.autograd.grad(g2[0, k, i, j], leaf, retain_graph=True)
                        out[1][n, t, k, i, j] = g2[0, k, i, j].detach()
                        out[2][n, t, k, i, j] = g3[0, k, i, j]
    return a, out


def reference_weights(a: torch.Tensor, d1, d2, d3) -> torch.Tensor:
    """The paper's alpha and weights, written out (alpha 0 where its denominator is 0)."""
    total = a.sum(dim=(2, 3))[:, None, :, None, None]
    denominator = 2 * d2 + total * d3
    alpha = torch.where(denominator != 0, d2 / denominator.where(denominator != 0, torch.ones(())), 0)
    return (alpha * d1.clamp(min=0)).sum(dim=(3, 4))


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(2, 3, 8, 8, dtype=torch.float64)


CLASSES = [[0, 2], [1, 0]]


def explain(model, x, targets=CLASSES, **options):
    totals = []
    explanation = GradCAMPlusPlusGeneral(model, "features", **options)(
        x, targets, progress=lambda done, total: totals.append((done, total))
    )
    return explanation, totals


@pytest.mark.parametrize("kind", ["probability", "logit", "exp"])
@pytest.mark.parametrize("skip", [False, True])
def test_weights_equal_an_element_by_element_autograd_loop(x, kind, skip):
    model = CurvedHead(skip=skip)
    a, (d1, d2, d3) = reference_derivatives(model, x, CLASSES, kind)
    explanation, totals = explain(model, x, score=kind)
    assert explanation.score_kind == kind
    expected = reference_weights(a, d1, d2, d3)
    assert expected.abs().max() > 1e-3  # not a vacuous comparison
    torch.testing.assert_close(explanation.weights["features"], expected, rtol=1e-10, atol=1e-12)
    assert totals[-1] == (4 * 4 * 4, 4 * 4 * 4)  # every channel and position: no pooling right after


def test_derivatives_equal_finite_differences(x):
    model = CurvedHead()
    with torch.no_grad():
        below = model.stem(x)
        a = model.features(below)

    def head(z: torch.Tensor) -> torch.Tensor:
        return model.head(z, below).softmax(1)[:, [2]]

    d2, d3 = diagonal_derivatives(head, a, None, chunk_size=16)
    assert d2.shape == d3.shape == (2, 1, 4, 4, 4) and d3.abs().max() > 1e-3
    h = 1e-2  # rounding ~1e-16 / h^3, truncation ~h^2 * (fifth derivative, ~1/16^5 after the pool)
    for k, i, j in itertools.product(range(4), range(4), range(4)):
        step = torch.zeros_like(a)
        step[:, k, i, j] = h
        f = {m: head(a + m * step)[:, 0] for m in (-2, -1, 0, 1, 2)}
        second = (f[1] - 2 * f[0] + f[-1]) / h**2
        third = (f[2] - 2 * f[1] + 2 * f[-1] - f[-2]) / (2 * h**3)
        torch.testing.assert_close(d2[:, 0, k, i, j], second, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(d3[:, 0, k, i, j], third, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("model", [make_tiny(), FlatMean()], ids=["pool", "flatten-mean"])
def test_exp_of_a_linear_head_is_the_closed_form(model):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    targets = [[0, 4], [2, 1], [3, 3]]
    general, totals = explain(model, images, targets, score="exp")
    closed = camlens.GradCAMPlusPlus(model, "features")(images, targets)
    logits = closed.logits.gather(1, closed.targets)
    torch.testing.assert_close(general.scores, logits.exp(), rtol=1e-12, atol=0)
    # The paper's weights use ReLU(dY/dA) = exp(S) ReLU(dS/dA); the closed form drops exp(S).
    torch.testing.assert_close(
        general.weights["features"] / general.scores[..., None], closed.weights["features"], rtol=0, atol=1e-10
    )
    torch.testing.assert_close(general.maps, closed.maps, rtol=0, atol=1e-10)
    assert closed.maps.amax() == 1
    # A pool right after the layer is read on the graph: one direction per channel.
    channels, positions = 8, 6 * 6
    assert totals[-1][1] == (channels if isinstance(model, type(make_tiny())) else channels * positions)


def test_logit_of_a_linear_head_has_no_curvature():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    explanation, _ = explain(make_tiny(), images, None, score="logit")
    assert torch.equal(explanation.weights["features"], torch.zeros(2, 1, 8, dtype=torch.float64))
    assert torch.equal(explanation.maps, torch.zeros_like(explanation.maps))


def test_probability_differs_from_the_closed_form():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    model = make_tiny()
    general, _ = explain(model, images, None)  # probability by default
    closed = camlens.GradCAMPlusPlus(model, "features")(images)
    assert general.score_kind == "probability"
    assert general.options == {"score": "probability", "chunk_size": 64, "max_directions": 50_000}
    assert (general.maps - closed.maps).abs().max() > 1e-3


def test_batch_equals_one_by_one_and_chunks_do_not_matter(x):
    model = CurvedHead(skip=True)
    whole, _ = explain(model, x, chunk_size=64)
    for chunk in (1, 7, 1000):
        other, _ = explain(model, x, chunk_size=chunk)
        torch.testing.assert_close(other.weights["features"], whole.weights["features"], rtol=1e-12, atol=1e-14)
    for n in range(x.shape[0]):
        single, _ = explain(model, x[n : n + 1], [CLASSES[n]], chunk_size=5)
        torch.testing.assert_close(single.weights["features"], whole.weights["features"][n : n + 1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(single.maps, whole.maps[n : n + 1], rtol=1e-12, atol=1e-12)


def test_channel_subset_takes_only_those_directions(x):
    model = CurvedHead()
    full, _ = explain(model, x)
    totals = []
    subset = GradCAMPlusPlusGeneral(model, "features")(
        x, CLASSES, channels=[1, 3], progress=lambda done, total: totals.append(total)
    )
    torch.testing.assert_close(subset.weights["features"][..., [1, 3]], full.weights["features"][..., [1, 3]])
    assert torch.equal(subset.weights["features"][..., [0, 2]], torch.zeros(2, 2, 2, dtype=torch.float64))
    assert totals[-1] == 2 * 4 * 4


@pytest.mark.parametrize("after", ["plain", "no-vmap"])
def test_untraceable_models_run_whole_with_the_layer_replaced(x, after):
    model = Untraceable(after)
    assert cut(model, "features") is None
    a, (d1, d2, d3) = reference_derivatives(model, x, CLASSES, "probability")
    explanation, totals = explain(model, x, chunk_size=10)
    torch.testing.assert_close(explanation.weights["features"], reference_weights(a, d1, d2, d3), rtol=1e-10, atol=1e-12)
    assert totals[-1] == (64, 64)


def test_a_model_without_forward_mode_derivatives_is_refused(x):
    with pytest.raises(camlens.CamlensError, match="in forward mode .*torch.func.jvp.*jvp.*use gradcam\\+\\+"):
        explain(Untraceable("no-forward-ad"), x)


def test_inference_copy_gives_the_same_weights(x):
    model = CurvedHead(skip=True)
    plain, _ = explain(model, x)
    copied, _ = explain(model, x, optimize=True)
    torch.testing.assert_close(copied.weights["features"], plain.weights["features"], rtol=1e-9, atol=1e-12)


def test_options_targets_and_name(x):
    model = CurvedHead()
    with pytest.raises(camlens.CamlensError, match="unknown score 'softmax'"):
        GradCAMPlusPlusGeneral(model, score="softmax")
    with pytest.raises(camlens.CamlensError, match="chunk_size must be a positive integer"):
        GradCAMPlusPlusGeneral(model, chunk_size=0)
    with pytest.raises(camlens.CamlensError, match="not units"):
        GradCAMPlusPlusGeneral(model, "features")(x, camlens.UnitTarget("conv", 0))
    for alias in ("gradcam++-general", "gradcampp-general", "Grad-CAM++ general", "GradCAMpp_general"):
        assert camlens.get_method(alias) is GradCAMPlusPlusGeneral
    assert camlens.get_method("gradcampp").name == "gradcam++"
    assert camlens.get_method("smoothgradcampp").name == "smoothgradcam++"
    assert "gradcam++-general" in camlens.list_methods()
    # A target's own score kind wins over the method's default, as for every method.
    explanation = camlens.explain(model, x, "gradcam++-general", targets=camlens.ClassTarget([0, 1], score="exp"))
    assert explanation.score_kind == "exp"


def test_target_functions_output_selectors_and_hooked_pools(x):
    model = CurvedHead()
    by_class, _ = explain(model, x, [[2], [2]])
    by_function, _ = explain(model, x, lambda output: output.softmax(1)[:, 2])
    assert by_function.score_kind == "target"
    torch.testing.assert_close(by_function.weights["features"], by_class.weights["features"], rtol=1e-12, atol=1e-15)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net(images), images.mean()

    paired = GradCAMPlusPlusGeneral(Pair(), "net.features", output=0)(x, [[2], [2]])
    torch.testing.assert_close(paired.weights["net.features"], by_class.weights["features"], rtol=1e-12, atol=1e-15)

    # A hook on the pool may change what it returns: no longer provably a spatial mean.
    tiny = make_tiny()
    images = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    pooled, totals = explain(tiny, images, None)
    tiny.pool.register_forward_hook(lambda module, inputs, output: output)
    hooked, hooked_totals = explain(tiny, images, None)
    assert (totals[-1][1], hooked_totals[-1][1]) == (8, 8 * 6 * 6)
    torch.testing.assert_close(hooked.weights["features"], pooled.weights["features"], rtol=1e-12, atol=1e-15)


def test_a_channels_last_map_stays_on_vmaps_batched_path():
    # The inference copy gives channels-last maps; pooling them under vmap fell back to a
    # per-direction loop ("performance drop" warning), many times slower.
    torch.manual_seed(1)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    model = make_tiny()
    plain, _ = explain(model, images, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copied, _ = explain(model, images, None, optimize=True)
    assert not [w for w in caught if "performance drop" in str(w.message)]
    torch.testing.assert_close(copied.weights["features"], plain.weights["features"], rtol=1e-9, atol=1e-12)


def test_a_call_above_the_direction_budget_is_refused_before_any_pass(monkeypatch):
    """364 s for the middle layer of a three-convolution, 16-channel CNN, unannounced (issue 21, item 9)."""
    import camlens.methods.gradcampp_general as general

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.randn(1, 3, 10, 10)

    def never(*args, **kwargs):
        raise AssertionError("a pass was run")

    monkeypatch.setattr(general, "diagonal_derivatives", never)
    with pytest.raises(CamlensError, match=r"would take 400 third-order passes .*\('1' \(4, 10, 10\): one per channel "
                                           r"and position\), more than max_directions=399"):
        camlens.explain(model, images, "gradcam++-general", target_layer="1", max_directions=399)
    monkeypatch.undo()
    explanation = camlens.explain(model, images, "gradcam++-general", target_layer="1", max_directions=400)
    assert explanation.options["max_directions"] == 400
    assert camlens.explain(model, images, "gradcam++-general", target_layer="3").options["max_directions"] == 50_000
    with pytest.raises(CamlensError, match="max_directions must be a positive integer"):
        camlens.explain(model, images, "gradcam++-general", max_directions=0)
