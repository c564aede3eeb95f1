"""Meta-methods: augmentation smoothing and principal-component smoothing around any method."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens import CamlensError
from camlens.methods import CAM, AugmentSmooth, EigenSmooth, GradCAM, ScoreCAM
from camlens.methods.meta import eigen_map
from camlens.targets import TopK
from conftest import count_rows, make_tiny

METHODS = {"cam": CAM, "gradcam": GradCAM, "scorecam": ScoreCAM}


def assert_same(a, b, atol=0.0):
    """Two explanations with the same maps, raw maps, weights, targets and scores."""
    def close(p, q):
        return torch.equal(p, q) if atol == 0 else torch.allclose(p, q, rtol=0, atol=atol)

    assert close(a.maps, b.maps)
    assert a.raw.keys() == b.raw.keys() and all(close(a.raw[k], b.raw[k]) for k in a.raw)
    assert all(close(a.weights[k], b.weights[k]) for k in a.weights)
    assert torch.equal(a.targets, b.targets) and close(a.scores, b.scores)


def symmetric_net(seed: int = 0) -> nn.Module:
    """Convolutions with left-right symmetric kernels, stride 1, padding 1 -> GAP -> linear: the
    features of a flipped image are the flipped features, the logits the same."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return model.eval()


def pattern_net() -> nn.Module:
    """Layer '0' is the image itself (a 1x1 identity convolution), then GAP and an identity
    linear head: CAM's raw map for class c is ReLU(channel c of the image)."""
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        model[3].weight.copy_(torch.eye(2))
        model[3].bias.zero_()
    return model.double().eval()


def block_image() -> torch.Tensor:
    """Channel 0 bright in a block at rows 2-5, columns 1-4 (off-centre both ways)."""
    x = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    x[0, 0, 2:6, 1:5] = 1.0
    return x


def centroid(map_: torch.Tensor) -> tuple[float, float]:
    rows, cols = torch.meshgrid(torch.arange(map_.shape[0]), torch.arange(map_.shape[1]), indexing="ij")
    total = map_.sum()
    return float((rows * map_).sum() / total), float((cols * map_).sum() / total)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 12, 12, dtype=torch.float64)


# -- augmentation smoothing ------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_the_identity_augmentation_alone_is_the_method(name, x):
    method = METHODS[name](make_tiny())
    smoothed = AugmentSmooth(method, flip=False, scales=(1.0,), factors=(1.0,))(x)
    assert_same(smoothed, method(x))
    assert smoothed.options["aug_smooth"] == {"flip": False, "scales": [1.0], "factors": [1.0]}
    assert {k: v for k, v in smoothed.options.items() if k != "aug_smooth"} == method.options()


@pytest.mark.parametrize("name", METHODS)
def test_a_flip_equivariant_model_gives_the_same_map_flipped(name):
    model = symmetric_net()
    torch.manual_seed(3)
    image = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    method = METHODS[name](model, target_layer="3")
    plain = method(image)
    # The map is not symmetric itself: a missing un-flip would average it with its mirror.
    assert (plain.maps - plain.maps.flip(-1)).abs().max() > 0.1
    flipped = method(image.flip(-1))
    assert torch.allclose(flipped.maps.flip(-1), plain.maps, atol=1e-10)
    smoothed = AugmentSmooth(method, flip=True, factors=(1.0,))(image)
    assert_same(smoothed, plain, atol=1e-10)


def test_maps_are_mapped_back_onto_the_image():
    x = block_image()
    method = CAM(pattern_net(), target_layer="0")
    plain = method(x, 0)
    assert torch.equal(plain.raw["0"][0, 0], x[0, 0])  # the known map: the block itself
    smoothed = AugmentSmooth(method, flip=True, scales=(1.0, 2.0), factors=(1.0,))(x, 0)
    # By hand: at scale 2 the map is the block upsampled (bilinear), shrunk back (antialiased);
    # flipped copies give the same once un-flipped; four copies.
    up = F.interpolate(x[:, :1], size=(32, 32), mode="bilinear", align_corners=False)
    up = (up - up.min()) / (up.max() - up.min())
    back = F.interpolate(up, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    expected = (2 * plain.maps + 2 * back) / 4
    assert torch.allclose(smoothed.maps, expected, atol=1e-12)
    assert torch.allclose(smoothed.raw["0"], (2 * plain.raw["0"] + 2 * back) / 4, atol=1e-12)
    # Where it lies: on the block (rows 2-5, columns 1-4), nothing on its mirror image.
    row, col = centroid(smoothed.maps[0, 0])
    assert abs(row - 3.5) < 0.05 and abs(col - 2.5) < 0.05
    assert smoothed.maps[0, 0, :, 11:].abs().max() < 1e-12


def test_factors_scale_the_raw_map_and_leave_the_map():
    x = block_image()
    method = CAM(pattern_net(), target_layer="0")
    plain = method(x, 0)
    smoothed = AugmentSmooth(method, flip=False, factors=(0.5, 2.0))(x, 0)
    assert torch.allclose(smoothed.maps, plain.maps, atol=1e-12)
    # CAM's raw map is linear in the image: the mean factor (0.5 + 1 + 2) / 3.
    assert torch.allclose(smoothed.raw["0"], plain.raw["0"] * 3.5 / 3, atol=1e-12)
    assert torch.allclose(smoothed.weights["0"], plain.weights["0"])
    assert torch.equal(smoothed.scores, plain.scores)


class HalvesNet(nn.Module):
    """Class 0 reads the left half of channel 0 (the image), class 1 the right half of channel 1
    (the image plus half of it shifted down a row): flipping an image swaps its top-1, and the
    two classes have different Grad-CAM maps."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.ReLU())
        with torch.no_grad():
            kernel = torch.zeros(2, 1, 3, 3)
            kernel[:, 0, 1, 1] = 1.0
            kernel[1, 0, 0, 1] = 0.5
            self.features[0].weight.copy_(kernel)

    def forward(self, x):
        a = self.features(x)
        half = a.shape[-1] // 2
        return torch.stack([a[:, 0, :, :half].sum((1, 2)), a[:, 1, :, half:].sum((1, 2))], dim=1)


def test_copies_explain_the_unaugmented_images_class():
    model = HalvesNet().double().eval()
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    x[..., 2:6, 0:3] = 1.0
    method = GradCAM(model, target_layer="features")
    assert method(x).targets.item() == 0 and method(x.flip(-1)).targets.item() == 1
    smoothed = AugmentSmooth(method, flip=True, factors=(1.0,))(x)
    assert smoothed.targets.item() == 0
    expected = (method(x, 0).maps + method(x.flip(-1), 0).maps.flip(-1)) / 2
    assert torch.allclose(smoothed.maps, expected, atol=1e-12)
    other = (method(x, 0).maps + method(x.flip(-1), 1).maps.flip(-1)) / 2
    assert (other - expected).abs().max() > 0.1


def test_top_k_and_probability_scores_carry_over(x):
    method = GradCAM(make_tiny())
    smoothed = AugmentSmooth(method, scales=(1.0, 1.5))(x, TopK(2, score="probability"))
    plain = method(x, TopK(2, score="probability"))
    assert torch.equal(smoothed.targets, plain.targets) and smoothed.score_kind == "probability"
    assert torch.equal(smoothed.scores, plain.scores)


@pytest.mark.parametrize("name", ["gradcam", "scorecam"])
def test_batch_equals_one_by_one(name, x):
    torch.manual_seed(2)
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    smooth = AugmentSmooth(METHODS[name](make_tiny()), scales=(1.0, 1.5), factors=(0.9, 1.0))
    batch = smooth(images)
    for index in range(3):
        one = smooth(images[index : index + 1])
        assert torch.allclose(batch.maps[index], one.maps[0], atol=1e-10)
        assert all(torch.allclose(batch.raw[k][index], one.raw[k][0], atol=1e-10) for k in one.raw)
        assert all(torch.allclose(batch.weights[k][index], one.weights[k][0], atol=1e-10) for k in one.weights)


def test_copies_of_one_size_go_in_one_call(x):
    model = make_tiny()
    rows, handle = count_rows(model)
    try:
        AugmentSmooth(GradCAM(model, target_layer="features"), scales=(1.0, 1.5))(x)
    finally:
        handle.remove()
    # The unaugmented images (they fix the targets), the 5 other copies at scale 1, the 6 at 1.5.
    assert rows == [2, 10, 12]


def test_progress_runs_over_all_calls(x):
    reports = []
    AugmentSmooth(ScoreCAM(make_tiny()), scales=(1.0, 1.5))(x, progress=lambda done, total: reports.append((done, total)))
    assert len(reports) > 3
    done = [d for d, _ in reports]
    assert done == sorted(done) and all(d <= t for d, t in reports)
    assert reports[-1][0] == reports[-1][1]


def test_a_model_of_one_input_size_is_told_to_leave_scales_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    assert AugmentSmooth(GradCAM(model, target_layer="0"))(x).maps.shape == (1, 1, 8, 8)
    with pytest.raises(CamlensError, match=r"resized by 1.5 to 12x12.*scales=\(1.0,\)"):
        AugmentSmooth(GradCAM(model, target_layer="0"), scales=(1.0, 1.5))(x)


@pytest.mark.parametrize(
    "options, text",
    [
        ({"flip": "yes"}, "flip must be True or False"),
        ({"scales": 1.1}, "scales must be a list"),
        ({"scales": [0]}, "scales must be positive finite numbers"),
        ({"scales": [-1.0]}, "scales must be positive"),
        ({"scales": [math.nan]}, "scales must be positive"),
        ({"factors": [True]}, "factors must be positive"),
        ({"factors": "1"}, "factors must be a list"),
    ],
)
def test_bad_options_are_refused(options, text):
    with pytest.raises(CamlensError, match=text):
        AugmentSmooth(GradCAM(make_tiny()), **options)


def test_only_method_objects_are_wrapped():
    with pytest.raises(CamlensError, match="AugmentSmooth wraps a camlens method object, not str"):
        AugmentSmooth("gradcam")
    with pytest.raises(CamlensError, match=r"AugmentSmooth\(EigenSmooth\(method\)\)"):
        EigenSmooth(AugmentSmooth(GradCAM(make_tiny())))
    with pytest.raises(CamlensError, match="progress must be a function"):
        AugmentSmooth(GradCAM(make_tiny()))(torch.rand(1, 3, 8, 8), progress=3)


# -- principal-component smoothing ------------------------------------------------------------


def first_component_maps(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """The eigen-smoothed raw maps by a plain loop: per image and target, positions as samples
    of the weighted channels, centred; the SVD's first right singular vector, signed so that its
    entries sum to a positive number; the ReLU of the projection."""
    n, t = weights.shape[:2]
    k, h, w = activation.shape[1:]
    out = torch.zeros(n, t, h, w, dtype=torch.float64)
    for i in range(n):
        for j in range(t):
            weight = weights[i, j].double()
            weight = weight[:, None, None] if weight.dim() == 1 else weight
            samples = (weight * activation[i].double()).reshape(k, h * w).T
            samples = samples - samples.mean(dim=0)
            _, _, vh = torch.linalg.svd(samples)
            v = vh[0] if vh[0].sum() > 0 else -vh[0]
            out[i, j] = torch.relu(samples @ v).reshape(h, w)
    return out


class ElementwiseGradCAM(GradCAM):
    """Weights per activation (the gradients themselves): the raw map is ReLU(sum_k g_k * A_k)."""

    def weigh(self, context):
        return dict(context.gradients)


def layer_output(model, layer, x):
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["a"]


@pytest.mark.parametrize("name", [*METHODS, "elementwise"])
def test_eigen_smoothing_is_the_first_principal_component(name, x):
    model = make_tiny()
    method = ElementwiseGradCAM(model) if name == "elementwise" else METHODS[name](model)
    targets = TopK(1) if name == "cam" else TopK(2)
    plain = method(x, targets)
    smoothed = EigenSmooth(method)(x, targets)
    (layer,) = plain.target_layers
    activation = layer_output(model, layer, x)
    expected = first_component_maps(plain.weights[layer], activation)
    assert expected.abs().max() > 0
    assert torch.allclose(smoothed.raw[layer], expected, rtol=0, atol=1e-10)
    up = F.interpolate(expected, size=(12, 12), mode="bilinear", align_corners=False)
    low, high = up.amin((-2, -1), keepdim=True), up.amax((-2, -1), keepdim=True)
    assert torch.allclose(smoothed.maps, (up - low) / (high - low), atol=1e-10)
    assert torch.equal(smoothed.weights[layer], plain.weights[layer])
    assert smoothed.options == {**method.options(), "eigen_smooth": True}
    assert not (smoothed.maps - plain.maps).abs().max() < 1e-3  # smoothing changed something


def test_eigen_smoothing_leaves_the_method_object_alone(x):
    method = GradCAM(make_tiny())
    before = method(x)
    EigenSmooth(method)(x)
    assert "raw_map" not in vars(method)
    assert_same(method(x), before)


def test_eigen_sign_where_the_components_entries_cancel():
    # Two channels a and -a, weighed 1 each: v_1 = (1, -1)/sqrt(2) sums to 0, so the sign makes
    # the projection's largest magnitude (at the 3) positive.
    a = torch.tensor([0.0, 0.0, 0.0, 3.0]).view(1, 2, 2)
    activation = torch.stack([a, -a], dim=1)  # (1, 2, 2, 2)
    raw = eigen_map(torch.ones(1, 1, 2), activation)
    expected = torch.relu(math.sqrt(2) * (a - a.mean()))
    assert torch.allclose(raw[0, 0], expected[0], atol=1e-5)
    flipped = eigen_map(torch.ones(1, 1, 2), -activation)
    assert torch.allclose(flipped[0, 0], expected[0], atol=1e-5)


def test_eigen_map_in_half_precision_runs_in_float32():
    torch.manual_seed(0)
    weight, activation = torch.randn(2, 1, 5), torch.rand(2, 5, 3, 3)
    half = eigen_map(weight.half(), activation.half())
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), eigen_map(weight, activation), atol=1e-2)


# -- both, through camlens.explain and the command line -----------------------------------------


def test_explain_smooths_both_ways(x):
    model = make_tiny()
    got = camlens.explain(model, x, "gradcam", aug_smooth=True, eigen_smooth=True)
    expected = camlens.AugmentSmooth(camlens.EigenSmooth(GradCAM(model)))(x)
    assert_same(got, expected)
    assert got.options["eigen_smooth"] is True
    assert got.options["aug_smooth"] == {"flip": True, "scales": [1.0], "factors": [0.9, 1.0, 1.1]}
    assert_same(camlens.explain(model, x, "gradcam", eigen_smooth=False), GradCAM(model)(x))
    with pytest.raises(CamlensError, match="aug_smooth must be True or False"):
        camlens.explain(model, x, "gradcam", aug_smooth="yes")


@pytest.fixture
def tiny_factory(tmp_path, monkeypatch):
    (tmp_path / "tinymeta.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tinymeta:factory"


def test_command_line_flags(tiny_factory, tmp_path, capsys):
    from camlens.cli.common import open_model
    from camlens.io import load_image
    from helpers import SAMPLES, run

    out = tmp_path / "out"
    common = ["--model", tiny_factory, "--input-size", "16", "-m", "gradcam", "--no-optimize"]
    code, _, err = run(["explain", SAMPLES / "coffee.png", *common, "--aug-smooth", "--eigen-smooth",
                        "--out", out], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["gradcam"] == {
        "eigen_smooth": True, "aug_smooth": {"flip": True, "scales": [1.0], "factors": [0.9, 1.0, 1.1]},
    }
    loaded = open_model(tiny_factory, None, 16, None, None, None, None)
    x = loaded.preprocess(load_image(SAMPLES / "coffee.png")).unsqueeze(0)
    expected = AugmentSmooth(EigenSmooth(GradCAM(loaded.module)))(x)
    saved = np.load(out / "coffee" / "maps.npz")["gradcam/maps"]
    assert np.allclose(saved, expected.maps[0].numpy(), atol=1e-6)
