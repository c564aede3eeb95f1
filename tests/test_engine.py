"""The engine: layer choice, fusion, in-place safety, backward depth, units, channel subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens import UnitTarget

from conftest import count_rows, make_tiny


def s(maps):
    """Reference min-max normalisation over the last two dimensions."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low)


def up(maps, size):
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class MeanPoolNet(nn.Module):
    """Global pooling done functionally: no pooling module at all."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "model, expected",
    [
        (make_tiny(), "features"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).double(), "3"),
        (MeanPoolNet().double(), "body"),
    ],
)
def test_default_layer_is_the_last_feature_map_before_pooling(model, expected, images):
    result = camlens.explain(model, images, "gradcam")
    assert result.target_layers == (expected,)
    assert result.default_layer
    named = camlens.explain(model, images, "gradcam", target_layer=expected)
    assert not named.default_layer
    torch.testing.assert_close(named.maps, result.maps, rtol=0, atol=0)


def test_layer_given_as_module_or_name(tiny, images):
    by_name = camlens.GradCAM(tiny, "features.3")(images)
    by_module = camlens.GradCAM(tiny, tiny.features[3])(images)
    assert by_module.target_layers == ("features.3",)
    torch.testing.assert_close(by_module.maps, by_name.maps, rtol=0, atol=0)


def test_in_place_relu_after_the_layer_does_not_change_what_is_recorded(tiny, images):
    """features.4 (batch norm) is followed by ReLU(inplace=True): the raw map must use the BN output."""
    result = camlens.GradCAM(tiny, "features.4")(images)
    activation = tiny.features[:5](images).detach().requires_grad_(True)
    logits = tiny.fc(torch.relu(activation).mean(dim=(2, 3)))
    classes = result.targets[:, 0]
    grad, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), activation)
    weights = grad.mean(dim=(2, 3))
    assert (activation < 0).any(), "the test needs negative BN outputs"
    torch.testing.assert_close(result.weights["features.4"][:, 0], weights)
    raw = torch.relu(torch.einsum("nk,nkhw->nhw", weights, activation.detach()))
    torch.testing.assert_close(result.raw["features.4"][:, 0], raw)


def test_backward_stops_at_the_target_layer(tiny, images):
    """No convolution is differentiated when the target layer is the last feature map."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        camlens.GradCAM(tiny, "features")(images)
    names = {event.name for event in prof.events()}
    assert not any("convolution_backward" in name for name in names)
    assert any("backward" in name.lower() for name in names), "a backward should have run"


def test_layer_fusion_averages_the_normalised_maps(tiny, images):
    layers = ["features.2", "features"]
    fused = camlens.GradCAM(tiny, layers)(images)
    single = [camlens.GradCAM(tiny, layer)(images).maps for layer in layers]
    assert fused.target_layers == tuple(layers)
    assert set(fused.raw) == set(layers)
    assert fused.raw["features.2"].shape[-2:] == (12, 12)
    assert fused.raw["features"].shape[-2:] == (6, 6)
    torch.testing.assert_close(fused.maps, (single[0] + single[1]) / 2)


def test_maps_are_at_input_resolution_in_unit_range(tiny, images):
    result = camlens.GradCAM(tiny, "features")(images, camlens.TopK(2))
    assert result.maps.shape == (3, 2, 12, 12)
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    expected = s(up(result.raw["features"], (12, 12)))
    torch.testing.assert_close(result.maps, expected)


def test_probability_score_and_probabilities(tiny, images):
    logits = tiny(images)
    result = camlens.GradCAM(tiny, "features")(images, camlens.ClassTarget([0, 1, 2], score="probability"))
    probabilities = logits.softmax(1)[torch.arange(3), torch.tensor([0, 1, 2])]
    assert result.score_kind == "probability"
    torch.testing.assert_close(result.scores[:, 0], probabilities)
    torch.testing.assert_close(result.probabilities[:, 0], probabilities)
    # The gradient of the probability, not of the logit: weights differ from the logit run.
    by_logit = camlens.GradCAM(tiny, "features")(images, [0, 1, 2])
    torch.testing.assert_close(by_logit.scores[:, 0], logits[torch.arange(3), [0, 1, 2]])
    assert not torch.allclose(by_logit.weights["features"], result.weights["features"])


def test_target_forms(tiny, images):
    logits = tiny(images)
    top1 = camlens.explain(tiny, images, "gradcam")
    assert torch.equal(top1.targets[:, 0], logits.argmax(1))
    every = camlens.explain(tiny, images, "gradcam", targets=2)
    assert every.targets.tolist() == [[2], [2], [2]]
    pairs = camlens.explain(tiny, images, "gradcam", targets=[[0, 4], [1, 3], [2, 2]])
    assert pairs.targets.tolist() == [[0, 4], [1, 3], [2, 2]]
    single = camlens.explain(tiny, images[0], "gradcam", targets=torch.tensor(3))
    assert single.maps.shape == (1, 1, 12, 12)


def test_to_numpy(tiny, images):
    result = camlens.explain(tiny, images, "gradcam")
    arrays = result.to_numpy()
    assert isinstance(arrays["maps"], np.ndarray)
    assert arrays["maps"].shape == (3, 1, 12, 12)
    assert arrays["weights"]["features"].shape == (3, 1, 8)
    np.testing.assert_array_equal(arrays["targets"], result.targets.numpy())


def test_float32_images_on_a_float64_model(tiny, images):
    as64 = camlens.explain(tiny, images, "gradcam")
    as32 = camlens.explain(tiny, images.float(), "gradcam")
    torch.testing.assert_close(as32.maps, as64.maps, rtol=1e-5, atol=1e-5)


# -- unit targets (Smooth Grad-CAM++'s neuron-level API) ------------------------------------

class MixNet(nn.Module):
    """features -> 1x1 conv 'mix' (linear in the features) -> pool -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.mix(self.features(x)).mean(dim=(2, 3)))


def test_unit_mean_of_the_target_layer_itself(tiny, images):
    """d mean(A^k) / dA^k_ij = 1/hw: Grad-CAM weight 1/hw on channel k, 0 elsewhere."""
    result = camlens.GradCAM(tiny, "features")(images, UnitTarget("features", 5))
    weights = torch.zeros(3, 1, 8, dtype=torch.float64)
    weights[:, :, 5] = 1 / 36
    torch.testing.assert_close(result.weights["features"], weights)
    activation = tiny.features(images)
    torch.testing.assert_close(result.scores[:, 0], activation[:, 5].mean(dim=(1, 2)))
    assert result.score_kind == "unit" and result.targets.tolist() == [[-1]] * 3
    assert result.probabilities is None


def test_unit_at_a_later_layer_closed_form(images):
    model = MixNet().double()
    w = model.mix.weight[:, :, 0, 0].detach()  # (4, 6)
    units = [UnitTarget("mix", 2), UnitTarget(model.mix, 1, position=(4, 7))]
    result = camlens.GradCAM(model, "features")(images, units)
    expected = torch.stack([w[2], w[1]]) / 144  # mean over 12x12 of W or of a delta times W
    torch.testing.assert_close(result.weights["features"], expected.expand(3, 2, 6))
    mix = model.mix(model.features(images))
    torch.testing.assert_close(result.scores[:, 0], mix[:, 2].mean(dim=(1, 2)))
    torch.testing.assert_close(result.scores[:, 1], mix[:, 1, 4, 7])

    # Grad-CAM++ of the single activation: g = W[1, k] at (4, 7) only.
    plus = camlens.GradCAMPlusPlus(model, "features")(images, UnitTarget("mix", 1, position=(4, 7)))
    activation = model.features(images).detach()
    g = w[1].expand(3, 6)
    alpha = g**2 / (2 * g**2 + activation.sum(dim=(2, 3)) * g**3)
    expected = torch.where(g != 0, alpha, 0) * torch.relu(g)
    torch.testing.assert_close(plus.weights["features"][:, 0], expected)


def test_unit_target_with_score_cam(images):
    model = MixNet().double()
    result = camlens.ScoreCAM(model, "features")(images, UnitTarget("mix", 0))
    activation = model.features(images).detach()
    for n in range(2):
        for k in range(6):
            a = activation[n, k]
            mask = s(up(a[None, None], (12, 12)))[0, 0] if a.max() > a.min() else torch.zeros(12, 12)
            unit = model.mix(model.features(images[n : n + 1] * mask))[0, 0].mean()
            torch.testing.assert_close(result.weights["features"][n, 0, k], unit)


def test_unit_target_errors(images):
    model = MixNet().double()
    with pytest.raises(camlens.CamlensError, match="at or after the target layer"):
        camlens.GradCAM(model, "mix")(images, UnitTarget("features.0", 0))
    with pytest.raises(camlens.CamlensError, match="valid: 0 to 3"):
        camlens.GradCAM(model, "features")(images, UnitTarget("mix", 4))
    with pytest.raises(camlens.CamlensError, match="outside layer 'mix'"):
        camlens.GradCAM(model, "features")(images, UnitTarget("mix", 0, position=(12, 0)))
    with pytest.raises(camlens.CamlensError, match="CAM explains classes only"):
        camlens.CAM(model, "mix")(images, UnitTarget("mix", 0))


# -- channel subsets ------------------------------------------------------------------------

def test_channel_subset_gradcam(tiny, images):
    full = camlens.GradCAM(tiny, "features")(images)
    subset = [1, 6, 3]
    part = camlens.GradCAM(tiny, "features")(images, channels=subset)
    weights = full.weights["features"]
    expected = torch.zeros_like(weights)
    expected[..., subset] = weights[..., subset]
    torch.testing.assert_close(part.weights["features"], expected)
    activation = tiny.features(images)[:, subset]
    raw = torch.relu(torch.einsum("ntk,nkhw->nthw", weights[..., subset], activation))
    torch.testing.assert_close(part.raw["features"], raw)
    assert part.channels == {"features": subset}
    keyed = camlens.GradCAM(tiny, "features")(images, channels={tiny.features: subset})
    torch.testing.assert_close(keyed.maps, part.maps, rtol=0, atol=0)


@pytest.mark.usefixtures("no_inference_copy")  # counts the model's own forwards
def test_channel_subset_score_cam_forwards_only_the_listed_channels(tiny, images):
    activation = tiny.features(images)
    subset = [0, 2, 5]
    rows, handle = count_rows(tiny)
    part = camlens.ScoreCAM(tiny, "features", batch_size=4)(images, channels=subset)
    handle.remove()
    constant = activation[:, subset].flatten(2)
    constant = constant.amax(-1) == constant.amin(-1)
    expected = 3 + int((~constant).sum()) + int(constant.any())
    assert sum(rows) == expected
    full = camlens.ScoreCAM(tiny, "features")(images)
    torch.testing.assert_close(part.weights["features"][..., subset], full.weights["features"][..., subset])
    assert (part.weights["features"][..., [1, 3, 4, 6, 7]] == 0).all()


@pytest.mark.usefixtures("no_inference_copy")  # counts the model's own forwards
def test_score_cam_forward_count_and_progress():
    """(non-constant channels + 1) forwards: constant channels share one forward of X * 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4)).double()
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # two channels are all zero after the ReLU
        model[0].weight[2] = 0.0
        model[0].bias[2] = 0.5  # one channel is constant and positive
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rows, handle = count_rows(model)
    calls = []
    result = camlens.ScoreCAM(model, "1", batch_size=4)(x, progress=lambda done, total: calls.append((done, total)))
    handle.remove()
    assert sum(rows) == 2 + 2 * 3 + 1
    assert calls[-1] == (7, 7) and calls[0] == (1, 7)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    # The three constant channels share the score of the all-zero input.
    zero = model(torch.zeros(1, 3, 8, 8, dtype=torch.float64)).softmax(1)[0]
    for n in range(2):
        c = result.targets[n, 0]
        torch.testing.assert_close(result.weights["1"][n, 0, :3], zero[c].expand(3))


def test_constant_maps_become_zero_and_nearly_constant_maps_do_not():
    from camlens.combine import upsample_normalise

    constant = torch.full((1, 1, 5, 5), 0.3, dtype=torch.float32)
    assert (upsample_normalise(constant, (17, 17)) == 0).all()
    nearly = torch.full((1, 1, 5, 5), 100.0, dtype=torch.float64)
    nearly[0, 0, 2, 2] += 1e-4
    result = upsample_normalise(nearly, (17, 17))
    assert result.max() == 1 and result.min() == 0


def test_public_names_resolve():
    assert set(camlens.__all__) - {"__version__"} == set(camlens._EXPORTS)
    for name in camlens.__all__:
        assert getattr(camlens, name) is not None
