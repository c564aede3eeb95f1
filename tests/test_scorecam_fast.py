"""Faster Score-CAM (``ScoreCAM(top_channels=...)``) and ScoreCAM's overridable ``masks``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.errors import CamlensError
from camlens.io import load_image
from camlens.models import efficientnet_lite0

LAYER = "3"


def make_model() -> nn.Sequential:
    """conv-relu-conv-relu (target "3", 7 channels at 6x6) -> pool -> linear; channel 0 of the
    target layer is all zero and channel 1 constant 0.5, so constant channels are covered."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 7, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 4),
    ).double().eval()
    with torch.no_grad():
        model[2].bias[0] = -100.0
        model[2].weight[1] = 0.0
        model[2].bias[1] = 0.5
    return model


@pytest.fixture
def model() -> nn.Sequential:
    return make_model()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


def activation(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[:4](x)


def top_by_variance(a: torch.Tensor, count: int) -> list[list[int]]:
    """Independently: per image, channels sorted by population variance (NumPy), ties to the lower index."""
    variance = np.var(a.numpy().reshape(a.shape[0], a.shape[1], -1), axis=-1)
    return [sorted(range(a.shape[1]), key=lambda k: (-row[k], k))[:count] for row in variance]


OPTIONS = [
    {},
    {"score": "logit"},
    {"channel_softmax": True},
    {"score": "logit", "baseline": "zeros"},
    {"score": "logit", "channel_softmax": True, "baseline": "zeros"},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("every", [7, 1.0, 100])
def test_every_channel_chosen_is_exact_score_cam(model, x, options, every):
    exact = camlens.ScoreCAM(model, LAYER, batch_size=4, **options)(x, [[0, 2]] * 3)
    fast = camlens.ScoreCAM(model, LAYER, batch_size=4, top_channels=every, **options)(x, [[0, 2]] * 3)
    torch.testing.assert_close(fast.weights[LAYER], exact.weights[LAYER], rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.raw[LAYER], exact.raw[LAYER], rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.maps, exact.maps, rtol=0, atol=1e-6)
    assert fast.options["top_channels"] == every
    assert "top_channels" not in exact.options and "chosen_channels" not in exact.options
    assert fast.options["chosen_channels"] == {LAYER: top_by_variance(activation(model, x), 7)}


@pytest.mark.parametrize("top, count", [(3, 3), (1, 1), (0.5, 4), (0.2, 1), (0.01, 1), (0.45, 3)])
def test_chosen_channels_are_the_top_by_variance_and_only_they_are_forwarded(model, x, top, count):
    a = activation(model, x)
    expected = top_by_variance(a, count)
    progress = []
    result = camlens.ScoreCAM(model, LAYER, batch_size=2, top_channels=top)(
        x, progress=lambda done, total: progress.append((done, total))
    )
    assert result.options["chosen_channels"] == {LAYER: expected}
    flat = a.flatten(2)
    constant = flat.amax(-1) == flat.amin(-1)
    # Chosen non-constant channels one by one; X * 0 once if a chosen channel is constant.
    chosen_constant = any(bool(constant[n, k]) for n in range(3) for k in expected[n])
    masked = sum(1 for n in range(3) for k in expected[n] if not constant[n, k]) + int(chosen_constant)
    assert progress[-1] == (masked, masked)


def test_unchosen_channels_weigh_zero_and_chosen_ones_as_in_exact(model, x):
    exact = camlens.ScoreCAM(model, LAYER, score="logit")(x)
    fast = camlens.ScoreCAM(model, LAYER, score="logit", top_channels=3)(x)
    soft = camlens.ScoreCAM(model, LAYER, score="logit", top_channels=3, channel_softmax=True)(x)
    a = activation(model, x)
    for n, chosen in enumerate(top_by_variance(a, 3)):
        others = [k for k in range(7) if k not in chosen]
        assert (fast.weights[LAYER][n, 0, others] == 0).all() and (soft.weights[LAYER][n, 0, others] == 0).all()
        scores = exact.weights[LAYER][n, 0, chosen]
        torch.testing.assert_close(fast.weights[LAYER][n, 0, chosen], scores)
        torch.testing.assert_close(soft.weights[LAYER][n, 0, chosen], scores.softmax(0))
        raw = torch.relu(torch.einsum("k,khw->hw", scores, a[n, chosen]))
        torch.testing.assert_close(fast.raw[LAYER][n, 0], raw)
        up = F.interpolate(raw[None, None], size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(fast.maps[n, 0], (up - up.min()) / (up.max() - up.min()))


def test_the_same_as_exact_score_cam_on_the_chosen_channel_subset(model, x):
    """Per image, Faster Score-CAM equals the engine's channel subset of the chosen channels."""
    fast = camlens.ScoreCAM(model, LAYER, top_channels=4, channel_softmax=True)(x)
    for n, chosen in enumerate(fast.options["chosen_channels"][LAYER]):
        subset = camlens.ScoreCAM(model, LAYER, channel_softmax=True)(x[n], channels=chosen)
        torch.testing.assert_close(fast.weights[LAYER][n], subset.weights[LAYER][0])
        torch.testing.assert_close(fast.maps[n], subset.maps[0])


def test_a_batch_equals_its_images_one_by_one(model, x):
    method = camlens.ScoreCAM(model, LAYER, batch_size=3, top_channels=0.4)
    batch = method(x, [1, 3, 0])
    for n, target in enumerate([1, 3, 0]):
        alone = method(x[n], target)
        torch.testing.assert_close(batch.maps[n], alone.maps[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(batch.weights[LAYER][n], alone.weights[LAYER][0], rtol=0, atol=1e-12)
        assert batch.options["chosen_channels"][LAYER][n] == alone.options["chosen_channels"][LAYER][0]


def test_within_a_channel_subset_and_numbered_as_in_the_layer(model, x):
    subset = [6, 2, 0, 4]
    result = camlens.ScoreCAM(model, LAYER, top_channels=2)(x, channels=subset)
    a = activation(model, x)
    expected = [[subset[k] for k in row] for row in top_by_variance(a[:, subset], 2)]
    assert result.options["chosen_channels"] == {LAYER: expected}
    for n, chosen in enumerate(expected):
        assert (result.weights[LAYER][n, 0] != 0).nonzero().flatten().tolist() == sorted(chosen)


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, -0.1, float("nan"), True, "10", [4]])
def test_bad_top_channels_are_refused_clearly(model, bad):
    with pytest.raises(CamlensError, match=r"top_channels must be a number of channels \(an integer >= 1\) or a "
                                           r"fraction of them \(a float in \(0, 1\]\)"):
        camlens.ScoreCAM(model, LAYER, top_channels=bad)
    with pytest.raises(CamlensError, match="top_channels must be"):
        camlens.explain(model, torch.zeros(1, 3, 12, 12, dtype=torch.float64), "scorecam", target_layer=LAYER,
                        top_channels=bad)


def test_the_masks_method_makes_the_masks(model, x):
    """A subclass's masks are the ones forwarded: all-ones masks forward X itself, so every
    non-constant channel weighs f(X); the constant channels keep the score of X * 0."""

    class Ones(camlens.ScoreCAM):
        calls = 0

        def masks(self, activations, size):
            Ones.calls += 1
            assert activations.shape[1:] == (1, 6, 6)
            return torch.ones(activations.shape[0], 1, *size, dtype=activations.dtype)

    result = Ones(model, LAYER, batch_size=4)(x)
    assert Ones.calls > 0
    zero = model(torch.zeros(1, 3, 12, 12, dtype=torch.float64)).softmax(1)[0]
    a = activation(model, x).flatten(2)
    constant = a.amax(-1) == a.amin(-1)
    for n in range(3):
        weights = result.weights[LAYER][n, 0]
        torch.testing.assert_close(weights[~constant[n]], result.scores[n, 0].expand(int((~constant[n]).sum())))
        torch.testing.assert_close(weights[constant[n]], zero[result.targets[n, 0]].expand(int(constant[n].sum())))


def test_embedded_model_top_channels_equals_the_chosen_subset():
    """On the real model: 8 channels, 8 masked inputs, the same weights as exact Score-CAM on them."""
    model = efficientnet_lite0()
    image = model.preprocess(load_image(Path(__file__).resolve().parents[1] / "samples" / "chelsea.png"))
    progress = []
    fast = camlens.ScoreCAM(model, top_channels=8)(image, progress=lambda done, total: progress.append(total))
    layer = fast.target_layers[0]
    chosen = fast.options["chosen_channels"][layer][0]
    assert len(chosen) == 8 and progress[-1] == 8
    subset = camlens.ScoreCAM(model)(image, channels=chosen)
    torch.testing.assert_close(fast.weights[layer], subset.weights[layer])
    torch.testing.assert_close(fast.maps, subset.maps)
