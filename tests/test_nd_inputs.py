"""Signals (N, C, L), volumes (N, C, D, H, W) and clips (issue 23, item 2): each method's maps
against a plain-torch computation on small Conv1d and Conv3d models and on a clip run frame by
frame through a 2-D backbone; the metrics on samples and voxels against hand computations; the
refusals where a formula does not extend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import spearmanr
from torch import nn

import camlens
from camlens.errors import CamlensError
from camlens.metrics import energy_pointing_game
from camlens.metrics.faithfulness import (
    deletion_curve,
    drop_and_increase,
    gaussian_blur,
    insertion_curve,
)
from camlens.metrics.sanity import cascading_randomisation


def signal_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, 5, padding=2), nn.ReLU(),
        nn.Conv1d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double().eval()


def volume_model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv3d(1, 5, 3, padding=1), nn.ReLU(),
        nn.Conv3d(5, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 3),
    ).double().eval()


class FrameModel(nn.Module):
    """A video classifier: each frame through a 2-D backbone, then the mean over time and space."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, clips):
        n, c, t, h, w = clips.shape
        maps = self.backbone(clips.transpose(1, 2).reshape(n * t, c, h, w))
        return self.head(maps.unflatten(0, (n, t)).mean(dim=(1, 3, 4)))


def signals():
    return torch.randn(3, 2, 37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def volumes():
    return torch.randn(2, 1, 5, 7, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def clips():
    return torch.randn(2, 3, 4, 8, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


def normalised(maps, spatial):
    flat = maps.flatten(-spatial)
    low = flat.amin(-1).reshape(*flat.shape[:-1], *(1,) * spatial)
    high = flat.amax(-1).reshape(*flat.shape[:-1], *(1,) * spatial)
    return (maps - low) / (high - low)


def up(raw, size):
    return F.interpolate(raw, size=tuple(size), mode=MODES[raw.dim()], align_corners=False)


def layer_output(model, layer, x):
    """The layer's output A and the logits, by a forward hook."""
    seen = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen["a"], logits


def plain_gradcam(model, layer, x):
    """Grad-CAM by hand: w = mean of dy/dA over the positions, L = ReLU(sum_k w_k A^k), then up and s."""
    x = x.clone()
    a, logits = layer_output(model, layer, x.requires_grad_(True))
    top = logits.argmax(dim=1)
    (grad,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), a)
    spatial = a.dim() - 2
    weights = grad.mean(dim=tuple(range(2, a.dim())))
    raw = torch.relu((weights.reshape(*weights.shape, *(1,) * spatial) * a).sum(dim=1, keepdim=True))
    return normalised(up(raw.detach(), x.shape[2:]), spatial), raw.detach()


@pytest.mark.parametrize("build, inputs, layer", [(signal_model, signals, "3"), (volume_model, volumes, "3")],
                         ids=["signal", "volume"])
def test_gradcam_on_signals_and_volumes_equals_plain_torch(build, inputs, layer):
    model, x = build(), inputs()
    expected, raw = plain_gradcam(model, layer, x)
    explanation = camlens.GradCAM(model)(x)
    assert explanation.target_layers == (layer,) and explanation.default_layer  # the last map, found
    assert explanation.maps.shape == (x.shape[0], 1, *x.shape[2:])  # the input's own shape
    assert torch.allclose(explanation.raw[layer], raw, atol=1e-12)
    assert torch.allclose(explanation.maps, expected, atol=1e-12)
    # One item, without its batch dimension, is a batch of one (the model's first convolution says).
    assert torch.allclose(camlens.GradCAM(model)(x[0]).maps, expected[:1], atol=1e-12)


def test_the_upsampling_is_linear_along_each_dimension():
    """Up is separable linear interpolation: a (1, 1, d, h, w) map upsampled trilinearly equals
    linear interpolation along each axis in turn, each computed by hand (half-pixel centres)."""
    raw = torch.rand(1, 1, 2, 3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    size = (5, 7, 9)

    def along(values, axis, out):
        n = values.shape[axis]
        centres = (torch.arange(out, dtype=torch.float64) + 0.5) * n / out - 0.5
        centres = centres.clamp(0, n - 1)
        low = centres.floor().long()
        high = (low + 1).clamp(max=n - 1)
        t = centres - low
        shape = [1] * values.dim()
        shape[axis] = out
        return (values.index_select(axis, low) * (1 - t).view(shape) + values.index_select(axis, high) * t.view(shape))

    by_hand = raw
    for axis, out in zip((2, 3, 4), size):
        by_hand = along(by_hand, axis, out)
    assert torch.allclose(camlens.combine.upsample(raw, size), by_hand, atol=1e-12)
    assert torch.allclose(camlens.combine.upsample(raw[:, :, 0, 0], (9,)), along(raw[:, :, 0, 0], 2, 9), atol=1e-12)


def plain_scorecam(model, layer, x):
    """Score-CAM by hand, one masked input at a time: w_k = softmax(f(X * s(Up(A^k))))_c."""
    a, logits = layer_output(model, layer, x)
    a = a.detach()
    top = logits.argmax(dim=1)
    raws = []
    for n in range(x.shape[0]):
        weights = []
        for k in range(a.shape[1]):
            channel = a[n:n + 1, k:k + 1]
            spread = channel.max() - channel.min()
            mask = torch.zeros_like(up(channel, x.shape[2:])) if spread == 0 else normalised(up(channel, x.shape[2:]), a.dim() - 2)
            with torch.no_grad():
                weights.append(model(x[n:n + 1] * mask).softmax(dim=1)[0, top[n]])
        w = torch.stack(weights)
        raws.append(torch.relu((w.reshape(-1, *(1,) * (a.dim() - 2)) * a[n]).sum(dim=0)))
    raw = torch.stack(raws)[:, None]
    return normalised(up(raw, x.shape[2:]), a.dim() - 2)


@pytest.mark.parametrize("build, inputs", [(signal_model, signals), (volume_model, volumes)], ids=["signal", "volume"])
def test_scorecam_on_signals_and_volumes_equals_a_plain_loop(build, inputs):
    model, x = build(), inputs()
    assert torch.allclose(camlens.ScoreCAM(model, batch_size=5)(x).maps, plain_scorecam(model, "3", x), atol=1e-10)


def test_cam_ablation_and_recipro_on_a_volume_by_hand():
    model, x = volume_model(), volumes()
    a, logits = layer_output(model, "3", x)
    a = a.detach()
    top = logits.argmax(dim=1)
    fc = model[-1].weight.detach()
    # CAM: w_k = fc weight of the class; the layer feeding the pooling is the ReLU "3".
    cam = camlens.CAM(model, "3")(x)
    raw = torch.relu(torch.einsum("nk,nkdhw->ndhw", fc[top], a))[:, None]
    assert torch.allclose(cam.raw["3"], raw, atol=1e-12)
    assert torch.allclose(cam.maps, normalised(up(raw, x.shape[2:]), 3), atol=1e-12)

    def head(features):
        return model[-1](features.mean(dim=(2, 3, 4)))

    score = logits.detach().gather(1, top[:, None])[:, 0]
    # Ablation-CAM: w_k = (y - y_k) / y with channel k zeroed.
    weights = torch.stack([(score - head(a * (torch.arange(a.shape[1]) != k).view(1, -1, 1, 1, 1)).gather(
        1, top[:, None])[:, 0]) / score for k in range(a.shape[1])], dim=1)
    ablation = camlens.AblationCAM(model, "3")(x)
    assert torch.allclose(ablation.weights["3"][:, 0], weights.detach(), atol=1e-10)
    # Recipro-CAM: the probability of the class with the features kept at one voxel only.
    recipro = camlens.ReciproCAM(model, "3")(x)
    expected = torch.zeros(a.shape[0], *a.shape[2:], dtype=torch.float64)
    for position in np.ndindex(*a.shape[2:]):
        spot = torch.zeros(1, 1, *a.shape[2:], dtype=torch.float64)
        spot[(0, 0, *position)] = 1
        expected[(slice(None), *position)] = head(a * spot).softmax(dim=1).gather(1, top[:, None])[:, 0].detach()
    assert torch.allclose(recipro.raw["3"][:, 0], expected, atol=1e-12)


def test_eigencam_and_gradcampp_on_a_signal_by_hand():
    model, x = signal_model(), signals()
    a, logits = layer_output(model, "3", x.clone().requires_grad_(True))
    top = logits.argmax(dim=1)
    (grad,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), a)
    a, grad = a.detach(), grad.detach()
    # Eigen-CAM: the centred (positions x channels) matrix's first right singular vector, signed
    # so that the projection's largest magnitude is positive; the map is ReLU of the projection.
    eigen = camlens.EigenCAM(model, "3")(x)
    for n in range(x.shape[0]):
        samples = a[n].T - a[n].T.mean(dim=0)
        projection = samples @ torch.linalg.svd(samples, full_matrices=False).Vh[0]
        if -projection.min() > projection.max():
            projection = -projection
        assert torch.allclose(eigen.raw["3"][n, 0], torch.relu(projection), atol=1e-10)
    # Grad-CAM++'s closed form: alpha = g^2 / (2 g^2 + sum(A) g^3), w = sum alpha ReLU(g).
    plus = camlens.GradCAMPlusPlus(model, "3")(x)
    total = a.sum(dim=2, keepdim=True)
    denominator = 2 * grad**2 + total * grad**3
    alpha = torch.where(denominator != 0, grad**2 / torch.where(denominator != 0, denominator, 1), 0)
    assert torch.allclose(plus.weights["3"][:, 0], (alpha * torch.relu(grad)).sum(dim=2), atol=1e-12)


@pytest.mark.parametrize("method", sorted(camlens.list_methods()))
@pytest.mark.parametrize("build, inputs", [(signal_model, signals), (volume_model, volumes)], ids=["signal", "volume"])
def test_every_method_gives_maps_of_the_inputs_shape(method, build, inputs):
    """Every method's formula extends to positions of any number of dimensions: maps of the
    input's own shape, in [0, 1], not blank, the raw maps at the layer's resolution."""
    model, x = build(), inputs()
    kwargs = {"n_samples": 3} if method in ("smoothgradcam++", "sscam") else {}
    explanation = camlens.get_method(method)(model, **kwargs)(x)
    assert explanation.maps.shape == (x.shape[0], 1, *x.shape[2:])
    assert float(explanation.maps.min()) >= 0 and float(explanation.maps.max()) <= 1
    assert not bool(explanation.blank.all())
    (raw,) = explanation.raw.values()
    assert raw.shape[2:] == layer_output(model, explanation.target_layers[0], x)[0].shape[2:]


def test_a_clip_through_a_2d_backbone_is_read_frame_by_frame():
    """The backbone's maps (N*T, K, h, w) are read as each clip's (N, K, T, h, w): Grad-CAM's
    weights average the gradient over time and space, and the map is upsampled trilinearly to
    the clip's (T, H, W)."""
    model, x = FrameModel().double().eval(), clips()
    explanation = camlens.GradCAM(model)(x)
    assert explanation.target_layers == ("backbone",)  # the Sequential, whose output is its last ReLU's
    assert explanation.options["reshape"] == "frames"
    assert explanation.maps.shape == (2, 1, 4, 8, 10)
    n, c, t, h, w = x.shape
    inputs = x.clone().requires_grad_(True)
    a, logits = layer_output(model, "backbone.3", inputs)
    top = logits.argmax(dim=1)
    (grad,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), a)
    a, grad = (v.detach().unflatten(0, (n, t)).transpose(1, 2) for v in (a, grad))  # (N, K, T, h, w)
    raw = torch.relu((grad.mean(dim=(2, 3, 4))[..., None, None, None] * a).sum(dim=1, keepdim=True))
    assert torch.allclose(explanation.raw["backbone"], raw, atol=1e-12)
    assert torch.allclose(explanation.maps, normalised(up(raw, (t, h, w)), 3), atol=1e-12)
    # Named, the same: and a gradient-free method runs through the same reading.
    named = camlens.GradCAM(model, "backbone.3", reshape="frames")(x)
    assert torch.equal(named.maps, explanation.maps)
    assert camlens.ScoreCAM(model, "backbone.3", reshape="frames")(x).maps.shape == (2, 1, 4, 8, 10)


# -- metrics on samples and voxels ----------------------------------------------------------------

def test_deletion_on_signals_removes_the_most_salient_samples_first():
    model, x = signal_model(), signals()
    maps = torch.rand(3, 37, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    classes = torch.tensor([0, 1, 2])
    curve = deletion_curve(model, x, maps, classes, steps=4)
    for n in range(3):
        order = sorted(range(37), key=lambda i: (-float(maps[n, i]), i))
        for step in range(5):
            kept = x[n].clone()
            kept[:, order[:math.floor(step * 37 / 4 + 0.5)]] = 0
            with torch.no_grad():
                expected = model(kept[None]).softmax(dim=1)[0, classes[n]]
            assert float(curve[n, step]) == pytest.approx(float(expected), abs=1e-12)


def test_insertion_starts_from_a_blur_along_every_axis_of_a_volume():
    model, x = volume_model(), volumes()
    kernel = np.exp(-np.arange(-2, 3) ** 2 / (2 * 1.5**2))
    kernel /= kernel.sum()
    by_hand = x.numpy()
    for axis in (2, 3, 4):
        by_hand = ndimage.correlate1d(by_hand, kernel, axis=axis, mode="nearest")
    assert np.allclose(gaussian_blur(x, 5, 1.5).numpy(), by_hand, atol=1e-12)
    maps = torch.rand(2, 5, 7, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    curve = insertion_curve(model, x, maps, torch.tensor([0, 2]), steps=2, kernel_size=5, sigma=1.5)
    with torch.no_grad():
        start = model(torch.from_numpy(by_hand)).softmax(dim=1)
        end = model(x).softmax(dim=1)
    assert torch.allclose(curve[:, 0], start[[0, 1], [0, 2]], atol=1e-12)
    assert torch.allclose(curve[:, -1], end[[0, 1], [0, 2]], atol=1e-12)


def test_drop_increase_and_energy_on_voxels_by_hand():
    model, x = volume_model(), volumes()
    maps = torch.rand(2, 5, 7, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    classes = torch.tensor([1, 0])
    result = drop_and_increase(model, x, maps, classes)
    with torch.no_grad():
        y = model(x).softmax(dim=1)[[0, 1], classes]
        o = model(x * maps[:, None]).softmax(dim=1)[[0, 1], classes]
    assert torch.allclose(result["drop"], 100 * torch.clamp(y - o, min=0) / y, atol=1e-12)
    assert torch.equal(result["increase"], 100 * (y < o).double())
    mask = torch.zeros(2, 5, 7, 6, dtype=torch.bool)
    mask[:, 1:3, 2:5, :4] = True
    energy = energy_pointing_game(maps, mask)
    assert torch.allclose(energy, (maps * mask).sum(dim=(1, 2, 3)) / maps.sum(dim=(1, 2, 3)), atol=1e-12)
    signal_maps = maps[:, 0, 0]
    assert torch.allclose(energy_pointing_game(signal_maps, mask[:, 1, 2]),
                          signal_maps[:, :4].sum(dim=1) / signal_maps.sum(dim=1), atol=1e-12)


# -- refusals -------------------------------------------------------------------------------------

def test_what_does_not_extend_is_refused_in_one_line():
    model, x = volume_model(), volumes()
    with pytest.raises(CamlensError, match=r"^augmentation smoothing flips and rescales images \(N, C, H, W\); inputs of "
                                           r"shape \(2, 1, 5, 7, 6\) are signals, volumes or clips"):
        camlens.explain(model, x, "gradcam", aug_smooth=True)
    with pytest.raises(CamlensError, match=r"^reshape 'nhwc' reads a layer's output for images \(N, C, H, W\), not for "
                                           r"inputs of shape \(2, 3, 4, 8, 10\)"):
        camlens.GradCAM(FrameModel().double().eval(), "backbone.3", reshape="nhwc")(clips())
    with pytest.raises(CamlensError, match=r"^unit position \(1, 2\) has 2 coordinate\(s\); layer '2''s 3x4x3 map has "
                                           r"3 dimension\(s\)$"):
        camlens.GradCAM(model, "0")(x, camlens.UnitTarget("2", 0, (1, 2)))
    with pytest.raises(CamlensError, match=r"^the model expects \(N, 2, L\) signals, got \(N, 3, 37\): convert the inputs "
                                           r"to 2 channel\(s\)$"):
        camlens.GradCAM(signal_model())(torch.randn(3, 3, 37, dtype=torch.float64))
    with pytest.raises(CamlensError, match=r"^layer 'backbone.3' outputs a tensor of shape \(8, 6, 4, 5\), not a feature "
                                           r"map \(N, channels, depth, height, width\); .*give reshape='frames'$"):
        camlens.GradCAM(FrameModel().double().eval(), "backbone.3")(clips())
    image_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(CamlensError, match=r"^reshape 'frames' reads a 2-D layer's maps of a clip's frames, one row per "
                                           r"frame \(N\*T, K, h, w\); layer '1' outputs .* for inputs \(2, 3, 8, 8\), not clips"):
        camlens.GradCAM(image_model.eval(), "1", reshape="frames")(torch.rand(2, 3, 8, 8))
    # A unit at one voxel is a unit: its map by hand is Grad-CAM's with the one-hot gradient.
    unit = camlens.GradCAM(model, "0")(x, camlens.UnitTarget("2", 1, (1, 2, 1)))
    assert torch.allclose(unit.scores[:, 0], layer_output(model, "2", x)[0][:, 1, 1, 2, 1].detach())


def test_the_sanity_cascade_ranks_a_signals_maps_over_all_their_samples():
    model, x = signal_model(), signals()
    result = cascading_randomisation(lambda m: camlens.GradCAM(m, "3")(x).maps, model, x)
    assert result["ssim"] is None  # an image's windows: undefined for signals
    maps = result["maps"]
    assert maps.shape[1:] == (3, 1, 37)
    for step in range(maps.shape[0] - 1):
        for n in range(3):
            a, b = maps[step + 1, n, 0].numpy(), maps[0, n, 0].numpy()
            if np.ptp(a) == 0 or np.ptp(b) == 0:
                continue
            assert float(result["spearman"][step, n, 0]) == pytest.approx(spearmanr(a, b).statistic, abs=1e-10)


def test_a_long_signal_is_drawn_as_its_envelope_and_keeps_a_brief_salient_stretch():
    """Past SIGNAL_POINTS samples, each column of the band is the map's largest value in it: a
    stretch of 50 salient samples in 2 million still shows, as the one red column of the band."""
    from camlens.render import SIGNAL_POINTS, signal_band

    length = 2_000_000
    saliency = np.zeros(length)
    saliency[1_000_000:1_000_050] = 1.0
    values = np.random.default_rng(0).normal(size=(1, length))
    figure = np.asarray(signal_band(values, saliency, colormap="gray"))
    plain = np.asarray(signal_band(values, np.zeros(length), colormap="gray"))
    assert figure.shape == plain.shape and length > SIGNAL_POINTS
    columns = np.flatnonzero((figure != plain).any(axis=(0, 2)))
    # Only around the middle of the axes (a grey band: the trace is black, the map 0 black, 1 white).
    assert columns.size and np.ptp(columns) < 0.02 * figure.shape[1]
    assert abs(columns.mean() - np.flatnonzero((plain != 255).any(axis=(0, 2))).mean()) < 0.1 * figure.shape[1]


def test_a_volume_is_drawn_as_a_montage_of_evenly_spaced_slices_and_a_clip_as_a_strip():
    from PIL import Image

    from camlens.render import MONTAGE_SIDE, captioned, chosen_slices, input_figure, overlay

    assert chosen_slices(5) == [0, 1, 2, 3, 4]
    assert chosen_slices(30) == [0, 4, 8, 12, 17, 21, 25, 29]  # eight, the first and the last included
    rng = np.random.default_rng(0)
    volume, saliency = rng.normal(size=(1, 30, 16, 20)), rng.random((30, 16, 20))
    montage = input_figure(volume, saliency)
    zoom = -(-MONTAGE_SIDE // 20)
    # The cell of slice 8 (third), by hand: the slice on the volume's own grey scale, enlarged pixel
    # for pixel, the map over it, the caption under it; lines of four cells, 4 pixels apart.
    grey = ((volume[0, 8] - volume.min()) / np.ptp(volume) * 255 + 0.5).astype(np.uint8)
    cell = Image.fromarray(grey, mode="L").convert("RGB").resize((20 * zoom, 16 * zoom), Image.Resampling.NEAREST)
    cell = np.asarray(captioned(overlay(cell, saliency[8]), "slice 8"))
    left = 2 * (cell.shape[1] + 4)
    assert montage.size == (4 * cell.shape[1] + 12, 2 * cell.shape[0] + 4)
    assert np.array_equal(np.asarray(montage)[:cell.shape[0], left:left + cell.shape[1]], cell)
    strip = input_figure(rng.normal(size=(3, 6, 16, 20)), rng.random((6, 16, 20)))  # three channels: RGB frames
    assert strip.size[0] == 6 * cell.shape[1] + 5 * 4 and strip.size[1] == cell.shape[0]
