"""Issue 30: the gaps mutation testing found in the methods (methods/*.py), each closed by a test
that computes the expected result independently: by hand, in a plain loop, or from the paper's
formula on a tiny model."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.errors import CamlensError
from camlens.methods.cam import CAM, linear_like
from camlens.targets import UnitTarget


class Head(nn.Module):
    """conv -> relu -> mean -> fc, plus ``offset`` added to every logit (0: a true CAM head)."""

    def __init__(self, offset: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spare = nn.Linear(5, 3)  # unused: a classifier of the wrong width
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.offset, self.scale = offset, scale
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.mul_(scale)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3))) + self.offset


def pictures(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(3))


# -- CAM ---------------------------------------------------------------------------------------------

class Holder(nn.Module):
    """A module with a linear layer's tensors but not its type (as in an exported model)."""

    def __init__(self, weight, bias=None, child=False):
        super().__init__()
        self.weight = weight
        self.bias = bias
        if child:
            self.inner = nn.ReLU()


@pytest.mark.parametrize("module, expected", [
    (nn.Linear(4, 3), True),
    (Holder(torch.ones(3, 4), torch.ones(3)), True),
    (Holder(torch.ones(3, 4)), True),
    (Holder(torch.ones(3, 4), torch.ones(4)), False),  # a bias of the inputs' length
    (Holder(torch.ones(3, 4), torch.ones(3, 1)), False),
    (Holder(torch.ones(3, 4), [1.0, 1.0, 1.0]), False),  # a bias that is not a tensor
    (Holder(torch.ones(3, 4, 1)), False),
    (Holder(torch.ones(3, 4, dtype=torch.long)), False),
    (Holder(torch.ones(3, 4), torch.ones(3), child=True), False),
    (Holder(None), False),
    (nn.Embedding(3, 4), False),
])
def test_what_can_be_cams_classifier(module, expected):
    assert linear_like(module) is expected


def test_cam_records_its_classifier_by_name_and_weighs_a_channel_subset():
    model = Head().eval()
    assert CAM(model, "relu").options() == {"fc": None}
    assert CAM(model, "relu", fc=model.fc).options() == {"fc": "fc"}
    expl = CAM(model, "relu")(pictures(), [2, 0], channels=[1, 3])
    weight = model.fc.weight.detach()
    expected = torch.zeros(2, 1, 4)
    expected[0, 0, [1, 3]], expected[1, 0, [1, 3]] = weight[2, [1, 3]], weight[0, [1, 3]]  # the others: 0
    assert torch.equal(expl.weights["relu"], expected)


def test_cams_refusals_name_the_layer_the_classifier_and_the_channels():
    model = Head().eval()
    with pytest.raises(CamlensError, match=r"no nn.Linear with 3 inputs \(the channels of layer '0'\)"):
        CAM(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(108, 2)), "0")(pictures())
    with pytest.raises(CamlensError, match=r"^the classifier takes 5 inputs but layer 'relu' has 4 channels"):
        CAM(model, "relu", fc="spare")(pictures())
    with pytest.raises(CamlensError, match=r"^the model's output is not fc\(global average pool of layer 'relu'\), "
                                           r"fc being 'fc': CAM needs"):
        CAM(Head(offset=1.0).eval(), "relu")(pictures())


@pytest.mark.parametrize("scale, offset, accepted", [
    (1.0, 0.5e-4, True), (1.0, 1.5e-4, False),  # logits below 1: the tolerance is 1e-4
    (4000.0, 0.1, True), (4000.0, 1.0, False),  # logits near 2000: 1e-4 of the largest
])
def test_cams_head_check_tolerates_rounding_relative_to_the_largest_logit(scale, offset, accepted):
    model = Head(offset=offset, scale=scale).eval()
    largest = model(pictures()).abs().max().item()
    assert (largest < 1.0) if scale == 1.0 else (largest > 1000.0)
    if accepted:
        CAM(model, "relu")(pictures())
    else:
        with pytest.raises(CamlensError, match="is not fc"):
            CAM(model, "relu")(pictures())


# -- channel subsets --------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, message", [
    ("abc", "a channel subset is a list of channel indices"),
    ([[1]], "a channel subset is a non-empty list of integer channel indices"),
    ([], "a channel subset is a non-empty list of integer channel indices"),
    ([1.0], "a channel subset is a non-empty list of integer channel indices"),
    ([1j], "a channel subset is a non-empty list of integer channel indices"),
    ([True], "a channel subset is a non-empty list of integer channel indices"),
    ([-1], "channel -1 is out of range: layer 'relu' has 4 channels (valid: 0 to 3)"),
    ([0, 4], "channel 4 is out of range: layer 'relu' has 4 channels (valid: 0 to 3)"),
    ([2, 2], "a channel subset lists a channel more than once"),
])
def test_a_channel_subset_is_checked(channels, message):
    with pytest.raises(CamlensError) as error:
        camlens.GradCAM(Head().eval(), "relu")(pictures(1), channels=channels)
    assert str(error.value) == message


def test_a_subset_of_one_channel_is_that_channels_term():
    model = Head().eval()
    full = camlens.GradCAM(model, "relu")(pictures(1), 0)
    one = camlens.GradCAM(model, "relu")(pictures(1), 0, channels=[3])
    activation = model.relu(model.conv(pictures(1))).detach()
    expected = torch.relu(full.weights["relu"][0, 0, 3] * activation[0, 3])
    assert torch.allclose(one.raw["relu"][0, 0], expected, atol=1e-7)


# -- the Grad-CAM family ------------------------------------------------------------------------------

def test_element_wise_weights_are_zero_where_the_activation_is():
    """w = g where g A > 0, else 0: on a layer after a ReLU, zero wherever A is 0, whatever g."""
    model = Head().eval()
    x = pictures(1)
    expl = camlens.GradCAMElementWise(model, "relu")(x, 1)
    activation = model.relu(model.conv(x)).detach().requires_grad_()
    model.fc(activation.mean(dim=(2, 3)))[0, 1].backward()
    grad, a = activation.grad[0], activation.detach()[0]
    assert (a == 0).any() and (grad[a == 0] != 0).any()  # the case that matters is there
    expected = torch.where(grad * a > 0, grad, torch.zeros(()))
    assert torch.allclose(expl.weights["relu"][0, 0], expected, atol=1e-9)


def test_layercams_scale_by_hand_and_its_limits():
    from camlens.methods.family import layercam_scale

    raw = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    got = layercam_scale(raw, 0.5)
    assert torch.equal(got[1], torch.zeros(1, 2, 2))  # an all-zero map stays zero, not 0 / 0
    assert torch.allclose(got[0, 0], torch.tanh(0.5 * torch.tensor([[0.0, 0.25], [0.5, 1.0]])))
    model = Head().eval()
    small = camlens.LayerCAM(model, "relu", scale=0.5)  # a gamma below 1 is a positive number too
    assert small.options() == {"scale": 0.5}
    plain = camlens.LayerCAM(model, "relu")(pictures(1), 0).raw["relu"]
    assert torch.allclose(small(pictures(1), 0).raw["relu"], layercam_scale(plain, 0.5))
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(CamlensError, match=r"^LayerCAM's scale is a positive number \(the paper's gamma, 2\), "
                                               r"a dict \{layer: gamma\}, or None for no scaling; got "):
            camlens.LayerCAM(model, "relu", scale=bad)
    named = camlens.LayerCAM(model, "relu", scale={"relu": 2.0}, optimize=True)
    assert named.optimize is True  # the engine's options reach the engine
    recorded = named.options()
    recorded["scale"]["relu"] = 9.0
    assert named.options() == {"scale": {"relu": 2.0}}  # the record is a copy


def test_an_exact_tie_keeps_the_sign_the_svd_gives():
    from camlens.methods.family import principal_axis

    features = torch.tensor([[[[1.0, -1.0], [0.0, 0.0]]]], dtype=torch.float64)  # projections +c and -c
    svd_sign = torch.linalg.svd(features.flatten(-2).transpose(-2, -1), full_matrices=False).Vh[..., 0, :]
    assert torch.equal(principal_axis(features), svd_sign)


# -- Score-CAM --------------------------------------------------------------------------------------

def test_channels_of_equal_variance_are_taken_in_index_order():
    from camlens.methods.scorecam import top_variance_channels

    spread = torch.tensor([1.0, 2.0] * 40)  # 80 channels, two variances: ties everywhere
    activations = spread[None, :, None, None] * torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert top_variance_channels(activations, 6).tolist() == [[1, 3, 5, 7, 9, 11]]
    assert top_variance_channels(activations, 42).tolist() == [list(range(1, 80, 2)) + [0, 2]]


# -- smoothing -----------------------------------------------------------------------------------------

def test_augmented_copies_keep_a_mask_of_the_wrong_size_wrong():
    """Copies that are not resized leave the mask as given: one of another size than the output
    is refused, not resized into place."""
    torch.manual_seed(0)
    segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    target = camlens.SemanticSegmentationTarget(1, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(CamlensError) as error:
        camlens.AugmentSmooth(camlens.GradCAM(segmenter, "1"))(torch.rand(1, 3, 4, 4), target)
    assert str(error.value) == ("the segmentation mask is (3, 3) but the model's output is (4, 4) per class: give "
                                "the mask at the output's resolution")


# -- gradient-free methods on a layer that is not square, with fewer channels than rows ---------------

def oblong():
    """conv (4 channels) -> ReLU [the target layer, 3 x 5 on 6 x 10 inputs] -> conv -> mean -> linear."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(4, 5, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval().double()


def test_recipro_on_an_oblong_layer_by_hand_with_its_progress():
    model, x = oblong(), torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen = []
    expl = camlens.ReciproCAM(model, "1", batch_size=4)(
        x, [2, 0], channels=[0, 3], progress=lambda done, total: seen.append((done, total)))
    features = model[:2](x).detach()
    assert features.shape[1:] == (4, 3, 5)
    expected = torch.zeros(2, 1, 3, 5, dtype=torch.float64)
    for n, c in ((0, 2), (1, 0)):
        for i in range(3):
            for j in range(5):
                kept = torch.zeros_like(features[n:n + 1])
                kept[0, [0, 3], i, j] = features[n, [0, 3], i, j]
                expected[n, 0, i, j] = model[2:](kept).softmax(1)[0, c]
    assert torch.allclose(expl.weights["1"], expected, rtol=1e-12)
    assert seen == [(4, 30), (8, 30), (12, 30), (16, 30), (20, 30), (24, 30), (28, 30), (30, 30)]


# -- every method's recorded options (resume compares them) --------------------------------------------

SCORE = {"score": "probability", "baseline": None, "channel_softmax": False, "batch_size": 16}


@pytest.mark.parametrize("name, kwargs, expected", [
    ("cam", {}, {"fc": None}),
    ("gradcam", {}, {}),
    ("gradcam++-general", {}, {"score": "probability", "chunk_size": 64, "max_directions": 50000}),
    ("gradcam++-general", {"score": "exp", "chunk_size": 3, "max_directions": 7},
     {"score": "exp", "chunk_size": 3, "max_directions": 7}),
    ("sscam", {}, {**SCORE, "n_samples": 35, "sigma": 2.0, "noise": "mask", "seed": None}),
    ("sscam", {"n_samples": 4, "sigma": 0.5, "noise": "input", "seed": 3, "baseline": "zeros", "batch_size": 2},
     {**SCORE, "baseline": "zeros", "batch_size": 2, "n_samples": 4, "sigma": 0.5, "noise": "input", "seed": 3}),
    ("iscam", {}, {**SCORE, "n_steps": 10}),
    ("iscam", {"n_steps": 3, "baseline": "zeros", "batch_size": 5, "channel_softmax": True, "score": "logit"},
     {**SCORE, "n_steps": 3, "baseline": "zeros", "batch_size": 5, "channel_softmax": True, "score": "logit"}),
    ("ablationcam", {}, {"batch_size": 16}),
    ("ablationcam", {"batch_size": 3}, {"batch_size": 3}),
    ("reciprocam", {}, {"batch_size": 16}),
    ("reciprocam", {"batch_size": 3}, {"batch_size": 3}),
    ("layercam", {}, {"scale": None}),
])
def test_the_recorded_options_of_each_method(name, kwargs, expected):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 5))
    method = camlens.METHODS[name](model, "1", optimize=True, **kwargs)
    assert method.options() == expected
    # the engine's options reach the engine through every constructor
    assert method.optimize is True and method.compile is False


def test_a_flipped_copy_with_a_channel_subset_by_hand():
    """AugmentSmooth with the image and its mirror image: raw maps, weights per activation and
    maps are the means of the two, the mirror's flipped back; the channel subset reaches both.
    The head reads every position (no pooling), so no weight is the same left and right."""
    model = Read(nn.Identity(), 60).eval().double()
    x = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    method = camlens.HiResCAM(model, "relu")
    got = camlens.AugmentSmooth(method, flip=True, factors=(1.0,))(x, [1, 2], channels=[0, 2])
    plain = method(x, [1, 2], channels=[0, 2])
    mirror = method(x.flip(-1), [1, 2], channels=[0, 2])
    assert torch.allclose(got.raw["relu"], (plain.raw["relu"] + mirror.raw["relu"].flip(-1)) / 2, atol=1e-7)
    assert torch.allclose(got.weights["relu"], (plain.weights["relu"] + mirror.weights["relu"].flip(-1)) / 2,
                          atol=1e-7)
    assert torch.allclose(got.maps, (plain.maps + mirror.maps.flip(-1)) / 2, atol=1e-6)
    assert got.channels == {"relu": [0, 2]}


# -- the engine's passes: units, outputs and channel subsets through Score-CAM and Smooth Grad-CAM++ -----

def dense():
    """conv -> ReLU [target] -> conv: the output is a 4-D map, whose channel 1 a unit also reads."""
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval().double()


@pytest.mark.parametrize("baseline", [None, "zeros"])
def test_a_unit_scores_as_the_function_reading_the_same_activation(baseline):
    model, x = dense(), pictures(2).double()
    unit = camlens.ScoreCAM(model, "1", baseline=baseline)(x, UnitTarget("2", 1))
    function = camlens.ScoreCAM(model, "1", baseline=baseline)(x, lambda out: out[:, 1].mean(dim=(-2, -1)))
    assert torch.allclose(unit.weights["1"], function.weights["1"], rtol=1e-12)
    assert torch.allclose(unit.scores, function.scores, rtol=1e-12)


class Pair(nn.Module):
    """Returns (an auxiliary tensor, the logits): ``output=1`` picks the logits."""

    def __init__(self):
        super().__init__()
        self.net = Head()

    def forward(self, x):
        return x.mean(dim=1), self.net(x)


@pytest.mark.parametrize("name", ["scorecam", "smoothgradcam++"])
def test_output_picks_the_same_scores_in_every_pass(name):
    pair = Pair().eval()
    options = {"seed": 0} if name == "smoothgradcam++" else {"baseline": "zeros"}
    picked = camlens.METHODS[name](pair, "net.relu", output=1, **options)(pictures(2), [0, 2])
    alone = camlens.METHODS[name](pair.net, "relu", **options)(pictures(2), [0, 2])
    assert torch.allclose(picked.weights["net.relu"], alone.weights["relu"], atol=1e-7)


def test_smooth_gradcampp_weighs_a_channel_subset_as_the_full_layer():
    """Grad-CAM++'s weight of channel k reads channel k's gradients and activation only: a subset
    gives the full layer's weights of those channels, noise for noise (the same seed)."""
    model, x = Head().eval(), pictures(2)
    full = camlens.SmoothGradCAMPlusPlus(model, "relu", seed=3, n_samples=3)(x, 1)
    some = camlens.SmoothGradCAMPlusPlus(model, "relu", seed=3, n_samples=3)(x, 1, channels=[0, 2])
    assert torch.allclose(some.weights["relu"][..., [0, 2]], full.weights["relu"][..., [0, 2]], atol=1e-7)
    assert torch.equal(some.weights["relu"][..., [1, 3]], torch.zeros(2, 1, 2))


# -- Grad-CAM++ (general): the spatial-mean shortcut is taken exactly where the head reads the mean ----

FUNCTIONAL = {  # reads written in forward itself, as the traced graph sees them
    "F pool 1": lambda a: F.adaptive_avg_pool2d(a, 1),
    "F pool output_size=1": lambda a: F.adaptive_avg_pool2d(a, output_size=1),
    "F pool 2": lambda a: F.adaptive_avg_pool2d(a, 2),
    "mean (2, 3)": lambda a: a.mean(dim=(2, 3)),
    "mean (-1, -2)": lambda a: a.mean((-1, -2)),
    "torch.mean (3, 2)": lambda a: torch.mean(a, dim=(3, 2)),
    "mean (1, 2)": lambda a: a.mean(dim=(1, 2)),
    "mean 3": lambda a: a.mean(dim=3),
    "mean and a sum": lambda a: a.mean(dim=(2, 3)) + a.sum(),
    "max": lambda a: a.amax(dim=(2, 3)),
    "cat": lambda a: torch.cat([a, a], dim=1),  # its one user holds the map second, in a list
}


class Read(nn.Module):
    """conv -> ReLU [the target layer, 4 channels at 3 x 5] -> a read (a module, or one of
    FUNCTIONAL called in forward) -> linear."""

    def __init__(self, read, width):
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.relu = nn.ReLU()
        self.read = read if isinstance(read, nn.Module) else None
        self.how = None if isinstance(read, nn.Module) else read
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        a = self.relu(self.conv(x))
        return self.fc((self.read(a) if self.how is None else FUNCTIONAL[self.how](a)).flatten(1))


def hooked_pool():
    pool = nn.AdaptiveAvgPool2d(1)
    pool.register_forward_hook(lambda module, inputs, output: output * 1.5)
    return pool


MEAN_READS = [
    ("pool 1", lambda: nn.AdaptiveAvgPool2d(1), 4, True),
    ("pool (1, 1)", lambda: nn.AdaptiveAvgPool2d((1, 1)), 4, True),
    ("pool 2", lambda: nn.AdaptiveAvgPool2d(2), 16, False),
    ("pool (1, 2)", lambda: nn.AdaptiveAvgPool2d((1, 2)), 8, False),
    ("pool with a hook", hooked_pool, 4, False),
    ("avg pool, not adaptive", lambda: nn.AvgPool2d((3, 5)), 4, False),
    *[(how, lambda how=how: how, width, mean) for how, width, mean in [
        ("F pool 1", 4, True), ("F pool output_size=1", 4, True), ("F pool 2", 16, False),
        ("mean (2, 3)", 4, True), ("mean (-1, -2)", 4, True), ("torch.mean (3, 2)", 4, True),
        ("mean (1, 2)", 5, False), ("mean 3", 12, False), ("mean and a sum", 4, False), ("max", 4, False),
        ("cat", 120, False)]],
]


@pytest.mark.parametrize("label, read, width, mean_only", MEAN_READS, ids=[m[0] for m in MEAN_READS])
def test_the_mean_shortcut_is_taken_exactly_where_the_head_reads_the_mean(label, read, width, mean_only, monkeypatch):
    model = Read(read(), width).eval().double()
    x = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    directions = 4 * (1 if mean_only else 15)
    method = camlens.METHODS["gradcam++-general"](model, "relu")
    assert (method.cost(4, 3, 5).after, method.cost(4, 3, 5).at_most) == (directions, False)
    seen = []
    fast = method(x, [0, 2], progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (directions, directions)
    with pytest.raises(CamlensError) as error:
        camlens.METHODS["gradcam++-general"](model, "relu", max_directions=directions - 1)(x, [0, 2])
    shape = "(4, 3, 5) (one per channel)" if mean_only else "(4, 3, 5)"
    assert str(error.value).startswith(f"gradcam++-general would take {directions} third-order passes of the model "
                                       f"after the target layer ('relu' {shape}: one per channel and position), "
                                       f"more than max_directions={directions - 1}: ")
    # The shortcut changes the work, never the numbers: every position's own derivatives agree.
    monkeypatch.setattr("camlens.methods.gradcampp_general._is_spatial_mean", lambda *args: False)
    slow = camlens.METHODS["gradcam++-general"](model, "relu")(x, [0, 2])
    assert torch.allclose(fast.weights["relu"], slow.weights["relu"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["smoothgradcam++", "sscam"])
def test_a_seed_is_any_64_bit_integer_signed_or_not(name):
    model = Head().eval()
    for seed in (-(2**63), 2**64 - 1, 0):
        camlens.METHODS[name](model, "relu", seed=seed)
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(CamlensError, match=rf"seed .*got {seed}"):
            camlens.METHODS[name](model, "relu", seed=seed)


def test_a_baseline_tensor_is_read_in_the_images_precision_and_its_shape_checked():
    model, x = Head().eval(), pictures(2)
    given = camlens.ScoreCAM(model, "relu", baseline=torch.zeros(3, 6, 6, dtype=torch.float64))(x, 1)
    zeros = camlens.ScoreCAM(model, "relu", baseline="zeros")(x, 1)
    assert torch.allclose(given.weights["relu"], zeros.weights["relu"], atol=1e-7)
    for shape in ((1, 2, 6, 6), (3, 3, 6, 6), (3, 6)):
        with pytest.raises(CamlensError) as error:
            camlens.ScoreCAM(model, "relu", baseline=torch.zeros(shape))(x, 1)
        assert str(error.value) == f"the baseline has shape {shape}; it must be (3, 6, 6) or (2, 3, 6, 6)"


class Keyed(nn.Module):
    """Head's network called as model(pixel_values=x, shift=s): keyword-only, with an extra input."""

    def __init__(self):
        super().__init__()
        self.net = Head()

    def forward(self, *, pixel_values, shift):
        return self.net(pixel_values + shift)


def test_eigen_smooth_passes_channels_progress_and_forward_inputs_on():
    from camlens.methods.meta import eigen_map

    model, x = Head().eval(), pictures(2)
    got = camlens.EigenSmooth(camlens.GradCAM(model, "relu"))(x, 1, channels=[1, 2, 3])
    plain = camlens.GradCAM(model, "relu")(x, 1, channels=[1, 2, 3])
    activation = model.relu(model.conv(x)).detach()
    weight = plain.weights["relu"]  # (N, T, 4): 0 on channel 0
    expected = eigen_map(weight[..., [1, 2, 3]], activation[:, [1, 2, 3]])
    assert torch.allclose(got.raw["relu"], expected, atol=1e-6)
    every = eigen_map(camlens.GradCAM(model, "relu")(x, 1).weights["relu"], activation)
    assert (expected - every).abs().max() > 0.1 * expected.abs().max()  # the subset matters here
    seen = []
    camlens.EigenSmooth(camlens.ScoreCAM(model, "relu"))(x, 1, progress=lambda done, total: seen.append(done))
    assert seen and seen[-1] > 0
    keyed = camlens.EigenSmooth(camlens.GradCAM(Keyed().eval(), "net.relu"))(
        x, 1, forward_kwargs={"shift": 0.5}, images_as="pixel_values")
    shifted = camlens.EigenSmooth(camlens.GradCAM(model, "relu"))(x + 0.5, 1)
    assert torch.allclose(keyed.maps, shifted.maps, atol=1e-6)


def test_the_third_order_passes_run_batched_under_vmap():
    """The directions go through the head a chunk at a time (vmap), not one by one: the head's
    Python code runs a few times per chunk, far fewer than once per direction."""
    model = Read("mean 3", 12).eval().double()  # every position: 4 x 15 = 60 directions
    calls = []
    model.fc.register_forward_pre_hook(lambda module, args: calls.append(1))
    x = torch.rand(1, 3, 6, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    camlens.METHODS["gradcam++-general"](model, "relu", chunk_size=64)(x, 0)
    assert 0 < len(calls) < 20


def test_score_cams_small_contracts():
    from camlens.methods.scorecam import scorecam_weights

    increase = torch.tensor([[[0.5, -1.0, 2.0]]])
    assert torch.equal(scorecam_weights(increase), increase)  # no softmax unless asked
    assert torch.allclose(scorecam_weights(increase, True), increase.softmax(-1))
    model = Head().eval()
    assert camlens.ScoreCAM(model, "relu")(pictures(1)).default_layer is False
    assert camlens.ScoreCAM(model, top_channels=2)(pictures(1)).default_layer is True
    with pytest.raises(CamlensError) as error:
        camlens.ScoreCAM(model, "relu", baseline="ones")
    assert str(error.value) == "baseline must be None, 'zeros' or a tensor in the model's input space"
    with pytest.raises(CamlensError, match=r"^batch_size must be a positive integer"):
        camlens.ScoreCAM(model, "relu", batch_size=0)


@pytest.mark.parametrize("images, total", [(pictures(2), 6 * 2 * 36), (pictures(1)[0], 6 * 1 * 36)])
def test_augment_smooth_reports_one_steady_total_over_its_calls(images, total):
    """Recipro-CAM costs h w = 36 passes per image and copy: 6 copies (the image, its mirror, each
    at 0.9 and 1.1); the first call's estimate of the calls to come is exact here, so every
    report gives the same total, and the last report is that total done. A 3-D image is one image."""
    seen = []
    camlens.AugmentSmooth(camlens.ReciproCAM(Head().eval(), "relu", batch_size=4))(
        images, 0, progress=lambda done, total: seen.append((done, total)))
    assert {t for _, t in seen} == {total}
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)


# -- the gradient-free methods' two ways of running the rest of the model --------------------------------

class Tokens(nn.Module):
    """Patch embedding -> tokens (N, 1 + 6, 5) with a class token -> a linear block [the target
    layer] -> the class token -> linear, plus a term per image from before the layer (N,) that the
    part after the layer reads. With ``branch``, a Python test on a tensor value: the model cannot
    be traced, so not cut at the layer; the methods replace the layer's output in the whole model."""

    def __init__(self, branch: bool):
        super().__init__()
        torch.manual_seed(9)
        self.patch = nn.Conv2d(3, 5, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, 5))
        self.block = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.branch = branch

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        shift = x.mean(dim=(1, 2, 3))  # one value per image, from before the layer
        if self.branch and bool(tokens.sum() > -1e9):
            tokens = tokens * 1.0
        out = torch.relu(self.block(tokens)) + tokens
        return self.head(out.mean(dim=1)) + shift[:, None]


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_the_cut_model_and_the_hooked_whole_model_score_alike(name):
    from camlens.accelerate import cut as cut_at

    assert cut_at(Tokens(False), "block") is not None and cut_at(Tokens(True), "block") is None
    x = torch.rand(3, 3, 4, 6, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    cut = camlens.METHODS[name](Tokens(False).double().eval(), "block", reshape="tokens:1:2x3", batch_size=4)
    whole = camlens.METHODS[name](Tokens(True).double().eval(), "block", reshape="tokens:1:2x3", batch_size=4)
    got_cut, got_whole = cut(x, [0, 2, 1]), whole(x, [0, 2, 1])
    assert got_cut.weights["block"].shape[0] == 3
    assert torch.allclose(got_cut.weights["block"], got_whole.weights["block"], rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_cut.maps, got_whole.maps, atol=1e-9)


class ReadsMore(nn.Module):
    """conv -> conv [the target layer] -> pooled with a gain -> linear, where the part after the
    layer reads, from before it, one value per image (N,), a vector of another length (4,) and a
    0-d tensor from the parameters, and a number (the input's colour count). With ``branch``, as
    :class:`Tokens`: not traceable, so the whole model runs with the layer's output replaced."""

    def __init__(self, branch: bool):
        super().__init__()
        torch.manual_seed(12)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = nn.Conv2d(4, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Linear(4, 5)
        self.branch = branch

    def forward(self, x):
        brightness = x.mean(dim=(1, 2, 3))
        gain = self.gain.exp()
        bias = self.gain.sum()
        colours = x.shape[1]
        a = torch.relu(self.layer(self.stem(x)))
        if self.branch and bool(a.sum() > -1e9):
            a = a * 1.0
        pooled = (a * gain.view(1, -1, 1, 1)).mean(dim=(2, 3)) * (colours / 3)
        return self.head(pooled) + bias + brightness[:, None]


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_a_cut_whose_rest_holds_values_of_every_kind_passes_its_check_and_is_kept(name):
    """The part after the layer gets each value it reads as it should: the per-image one taken
    per row, the others as they are. So the cut passes its check (it is kept for the next call)
    and scores as the whole model run with the layer's output replaced; Ablation-CAM's weights
    are those of a plain loop that zeroes each channel with a hook. Three images, four channels:
    the vector of length 4 is not one value per image."""
    from camlens.accelerate import remembered_cut

    x = torch.rand(3, 3, 6, 8, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    model = ReadsMore(False).double().eval()
    method = camlens.METHODS[name](model, "layer", batch_size=2)
    got = method(x, [0, 3, 1])
    assert remembered_cut(model, "layer", method.cuts) is not None
    whole = camlens.METHODS[name](ReadsMore(True).double().eval(), "layer", batch_size=2)(x, [0, 3, 1])
    assert torch.allclose(got.weights["layer"], whole.weights["layer"], rtol=1e-10, atol=1e-12)
    if name == "ablationcam":
        rows = torch.arange(3)
        with torch.no_grad():
            score = model(x)[rows, [0, 3, 1]]
            expected = torch.empty(3, 4, dtype=torch.float64)
            for k in range(4):
                def zero(module, inputs, output, k=k):
                    output = output.clone()
                    output[:, k] = 0
                    return output

                handle = model.layer.register_forward_hook(zero)
                try:
                    # relu(0) = 0: zeroing the conv's channel zeroes the activation's
                    expected[:, k] = (score - model(x)[rows, [0, 3, 1]]) / score
                finally:
                    handle.remove()
        assert torch.allclose(got.weights["layer"].reshape(3, 4), expected, rtol=1e-9, atol=1e-12)


def test_the_general_gradcampp_head_passes_the_rest_of_every_kind_on():
    """The general Grad-CAM++ runs the part after the layer on the map's directions with what
    else that part reads (copied where it is a tensor, given as it is where it is a number): the
    same weights as on the model that cannot be cut."""
    x = torch.rand(2, 3, 6, 8, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    cut = camlens.METHODS["gradcam++-general"](ReadsMore(False).double().eval(), "layer")(x, [0, 3])
    whole = camlens.METHODS["gradcam++-general"](ReadsMore(True).double().eval(), "layer")(x, [0, 3])
    assert torch.allclose(cut.weights["layer"], whole.weights["layer"], rtol=1e-9, atol=1e-12)
    assert cut.weights["layer"].abs().max() > 0


def test_a_cut_that_fails_its_check_is_not_kept():
    """A layer of tokens: the model traces and is cut, but the cut cannot take the map, so the
    check refuses it and the method object keeps nothing to check again on its next call."""
    from camlens.accelerate import cut as cut_at
    from camlens.accelerate import remembered_cut

    model = Tokens(False).double().eval()
    assert cut_at(model, "block") is not None
    method = camlens.AblationCAM(model, "block", reshape="tokens:1:2x3")
    method(torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(14), dtype=torch.float64), 1)
    assert remembered_cut(model, "block", method.cuts) is None


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_the_whole_model_path_replaces_the_layer_in_the_inference_copy_it_runs(name):
    """With ``optimize``, the model that runs is the inference copy: the hook that replaces the
    layer's output goes on the copy's layer, or the scores would be those of the copy unchanged."""
    from camlens.accelerate import inference_copy

    model = Tokens(True).double().eval()
    x = torch.rand(3, 3, 4, 6, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    assert inference_copy(model, x) is not None
    fast = camlens.METHODS[name](model, "block", reshape="tokens:1:2x3", optimize=True)(x, [0, 2, 1])
    plain = camlens.METHODS[name](model, "block", reshape="tokens:1:2x3")(x, [0, 2, 1])
    assert torch.allclose(fast.weights["block"], plain.weights["block"], rtol=1e-9, atol=1e-12)
    assert fast.weights["block"].abs().max() > 0


class Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = dense()

    def forward(self, x, shift):
        return self.net(x).mean(dim=(2, 3)) + shift


def test_the_model_is_traced_only_where_a_cut_can_serve():
    """Tracing a model to cut it is start-up work, named as such; it is skipped where the cut
    could not be used: for unit targets (read on layers the cut part does not run) and with
    forward inputs (a traced part would not get them)."""
    from camlens.timing import take_start_up

    x = pictures(2).double()
    take_start_up()
    camlens.AblationCAM(dense(), "1")(x, lambda out: out[:, 1].mean(dim=(-2, -1)))
    assert "cutting the model" in take_start_up()
    camlens.AblationCAM(dense(), "1")(x, UnitTarget("2", 1))
    assert "cutting the model" not in take_start_up()
    camlens.AblationCAM(Shifted(), "net.1")(x, 2, forward_args=(torch.ones(3, dtype=torch.float64),))
    assert "cutting the model" not in take_start_up()


@pytest.mark.parametrize("case", ["tokens", "unit"])
def test_smooth_gradcampp_without_noise_is_gradcampp(case):
    """With noise_level 0 every noisy copy is the image: the averaged derivatives are the image's,
    so Smooth Grad-CAM++ is Grad-CAM++, also on a token layer and for a unit target."""
    if case == "tokens":
        model, layer, options, target = Tokens(False).double().eval(), "block", {"reshape": "tokens:1:2x3"}, 1
        x = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    else:
        model, layer, options, target = dense(), "1", {}, UnitTarget("2", 2)
        x = pictures(2).double()
    smooth = camlens.SmoothGradCAMPlusPlus(model, layer, noise_level=0.0, n_samples=3, seed=0, **options)(x, target)
    plain = camlens.GradCAMPlusPlus(model, layer, **options)(x, target)
    assert torch.allclose(smooth.weights[layer], plain.weights[layer], rtol=1e-9, atol=1e-12)


def test_augment_smooth_keeps_the_score_kind_and_names_the_size_a_model_refused():
    model, x = Head().eval(), pictures(2)
    target = camlens.ClassTarget([1, 2], score="logit")
    method = camlens.ScoreCAM(model, "relu")
    got = camlens.AugmentSmooth(method, flip=True, factors=(1.0,))(x, target)
    plain, mirror = method(x, target), method(x.flip(-1), target)
    assert torch.allclose(got.weights["relu"], (plain.weights["relu"] + mirror.weights["relu"]) / 2, atol=1e-7)
    fixed = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 10, 3)).eval()
    with pytest.raises(CamlensError) as error:
        camlens.AugmentSmooth(camlens.GradCAM(fixed, "1"), scales=(1.0, 0.5))(torch.rand(1, 3, 6, 10), 0)
    assert str(error.value).endswith("(on the copies resized by 0.5 to 3x5: a model that takes one input size only "
                                     "needs scales=(1.0,))")


def test_augment_smooth_shrinks_a_side_to_one_pixel_at_least():
    sizes = []
    model = Head().eval()
    model.conv.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    camlens.AugmentSmooth(camlens.GradCAM(model, "relu"), scales=(1.0, 0.4), factors=(1.0,), flip=False)(
        torch.rand(1, 3, 2, 3), 0)
    assert (1, 1) in sizes  # round(0.8) x round(1.2)


@pytest.mark.parametrize("branch", [False, True])
def test_third_order_passes_on_a_token_layer_match_the_closed_form(branch):
    """Grad-CAM++'s closed form is exact where the score is exp of a piecewise-linear function of
    the layer: the general method (score exp) must give it, on tokens, cut or hooked (its weights
    read ReLU(dY/dA) = exp(S) ReLU(dS/dA), the closed form's without the factor exp(S))."""
    model = Tokens(branch).double().eval()
    x = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    general = camlens.METHODS["gradcam++-general"](model, "block", reshape="tokens:1:2x3", score="exp",
                                                   chunk_size=5)(x, [0, 2])
    closed = camlens.GradCAMPlusPlus(model, "block", reshape="tokens:1:2x3")(x, [0, 2])
    assert torch.allclose(general.weights["block"] / general.scores[..., None], closed.weights["block"],
                          rtol=1e-8, atol=1e-12)


class Scaled(nn.Module):
    """The part after the layer scales the logits, in place, by a tensor from before the layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(13)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        scale = x.mean(dim=(1, 2, 3))[:, None] + 2.0
        logits = self.fc(self.relu(self.conv(x)).flatten(2).amax(dim=2))
        return logits * scale.mul_(1.5)


def test_the_third_order_passes_do_not_see_each_others_in_place_changes():
    model = Scaled().double().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    one = camlens.METHODS["gradcam++-general"](model, "relu", chunk_size=1)(x, [0, 1])
    all_at_once = camlens.METHODS["gradcam++-general"](model, "relu", chunk_size=1000)(x, [0, 1])
    assert torch.allclose(one.weights["relu"], all_at_once.weights["relu"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_an_all_zero_input_is_scored_with_each_images_own_inputs(name):
    """A shift per image (PerImage): the baseline forwarded once for all images must still be
    scored with each image's shift; the batched call equals each image explained alone."""
    model, x = Keyed().eval(), pictures(3)
    shifts = torch.tensor([0.0, 0.7, -0.4]).view(3, 1, 1, 1)
    options = {"baseline": "zeros"} if name == "scorecam" else {}
    batched = camlens.METHODS[name](model, "net.relu", **options)(
        x, [0, 1, 2], forward_kwargs={"shift": camlens.PerImage(shifts)}, images_as="pixel_values")
    for n in range(3):
        alone = camlens.METHODS[name](model, "net.relu", **options)(
            x[n:n + 1], [n], forward_kwargs={"shift": shifts[n:n + 1]}, images_as="pixel_values")
        assert torch.allclose(batched.weights["net.relu"][n], alone.weights["net.relu"][0], atol=1e-6)


# -- names, wrappers and small refusals ----------------------------------------------------------------

def test_methods_are_found_by_their_names_and_close_misspellings():
    from camlens.methods import get_method

    assert get_method("gradcampp") is camlens.METHODS["gradcam++"]
    assert get_method("GradCAMpp-General") is camlens.METHODS["gradcam++-general"]
    assert get_method("gradcam") is camlens.METHODS["gradcam"]
    with pytest.raises(CamlensError) as error:
        get_method("gradcan")
    assert "; did you mean gradcam or xgradcam or gradcam++? (available: cam, gradcam," in str(error.value)
    with pytest.raises(CamlensError) as error:
        get_method("zzzzzz")
    assert "did you mean" not in str(error.value)
    # A part of a name is close enough (a similarity of 0.5, below difflib's default of 0.6).
    for part, suggested in (("smooth", "smoothgradcam++"), ("ablate", "ablationcam")):
        with pytest.raises(CamlensError) as error:
            get_method(part)
        assert f"; did you mean {suggested}? (available:" in str(error.value)
    with pytest.raises(CamlensError, match="^a method is named by a string, not int$"):
        get_method(3)


def test_the_smoothing_wrappers_refuse_what_they_cannot_wrap_or_call():
    with pytest.raises(CamlensError, match="^EigenSmooth wraps a camlens method object, not str$"):
        camlens.EigenSmooth("gradcam")
    with pytest.raises(CamlensError) as error:
        camlens.EigenSmooth(camlens.AugmentSmooth(camlens.GradCAM(Head(), "relu")))
    assert str(error.value) == ("EigenSmooth wraps a camlens method object, not AugmentSmooth: smooth both ways "
                                "with AugmentSmooth(EigenSmooth(method))")
    with pytest.raises(CamlensError, match=r"^progress must be a function progress\(done, total\), not int$"):
        camlens.AugmentSmooth(camlens.GradCAM(Head().eval(), "relu"))(pictures(1), 0, progress=5)


def test_class_targets_refuse_booleans_and_complex_numbers():
    model = Head().eval()
    with pytest.raises(CamlensError, match="^a class target is an integer index, not a boolean$"):
        camlens.GradCAM(model, "relu")(pictures(1), True)
    with pytest.raises(CamlensError, match="^class targets must be integers, got torch.complex64$"):
        camlens.GradCAM(model, "relu")(pictures(1), torch.tensor([1j]))


def test_a_score_target_called_alone_reads_one_row_per_image():
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 2, 3] = True
    output = torch.rand(2, 5, 3, 4)  # 2 images, 5 classes
    target = camlens.SemanticSegmentationTarget(1, masks)
    assert torch.equal(target(output), torch.stack([output[0, 1, 0, 0], output[1, 1, 2, 3]]))
    with pytest.raises(CamlensError) as error:
        target(torch.rand(3, 5, 3, 4))
    assert str(error.value) == ("the mask of shape (2, 3, 4) has no entry for image 2: give one for all images, or one "
                                "per image (images first)")


class Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Head()

    def forward(self, x, shift):
        return self.net(x + shift)


def test_the_wrappers_pass_every_kind_of_forward_input_and_layer_name_on():
    from camlens.methods.family import layercam_scale
    from camlens.methods.meta import eigen_map

    model, x = Head().eval(), pictures(2)
    eigen = camlens.EigenSmooth(camlens.GradCAM(Positional().eval(), "net.relu"))(x, 1, forward_args=(0.5,))
    assert torch.allclose(eigen.maps, camlens.EigenSmooth(camlens.GradCAM(model, "relu"))(x + 0.5, 1).maps, atol=1e-6)
    augmented = camlens.AugmentSmooth(camlens.GradCAM(Keyed().eval(), "net.relu"), factors=(1.0,))(
        x, 1, forward_kwargs={"shift": 0.5}, images_as="pixel_values")
    shifted = camlens.AugmentSmooth(camlens.GradCAM(model, "relu"), factors=(1.0,))(x + 0.5, 1)
    assert torch.allclose(augmented.maps, shifted.maps, atol=1e-6)
    scaled = camlens.EigenSmooth(camlens.LayerCAM(model, "relu", scale={"relu": 2.0}))(x, 1)
    plain = camlens.LayerCAM(model, "relu")(x, 1)
    activation = model.relu(model.conv(x)).detach()
    assert torch.allclose(scaled.raw["relu"], layercam_scale(eigen_map(plain.weights["relu"], activation), 2.0),
                          atol=1e-6)
    with pytest.raises(CamlensError, match="^EigenSmooth wraps a camlens method object, not str"):
        camlens.EigenSmooth("gradcam")


class OneAtATime(nn.Module):
    """Head's network, refusing batches of more than one image."""

    def __init__(self):
        super().__init__()
        self.net = Head()

    def forward(self, x):
        if x.shape[0] > 1:
            raise ValueError("one image at a time")
        return self.net(x)


def test_copies_refused_at_the_images_own_size_say_no_more_than_the_model():
    with pytest.raises(CamlensError) as error:
        camlens.AugmentSmooth(camlens.GradCAM(OneAtATime().eval(), "net.relu"))(pictures(1), 0)
    assert "one image at a time" in str(error.value) and "resized by" not in str(error.value)


def test_more_refusals_and_reports_by_hand():
    model = Head().eval()
    with pytest.raises(CamlensError, match=r"^fc must be an nn.Linear \(or a linear layer of an exported model\), "
                                           r"not ReLU$"):
        CAM(model, "relu", fc="relu")
    with pytest.raises(CamlensError, match=r"^batch_size must be a positive integer"):
        camlens.SmoothGradCAMPlusPlus(model, "relu", batch_size=0)
    seen = []
    camlens.SmoothGradCAMPlusPlus(model, "relu", n_samples=4, batch_size=3, seed=0)(
        pictures(2), 0, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 8), (6, 8), (8, 8)]  # 2 images x 4 noisy copies, 3 at a time


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_a_unit_scores_as_the_function_reading_the_same_activation_without_gradients(name):
    model, x = dense(), pictures(2).double()
    unit = camlens.METHODS[name](model, "1", batch_size=5)(x, UnitTarget("2", 1))
    function = camlens.METHODS[name](model, "1", batch_size=5)(x, lambda out: out[:, 1].mean(dim=(-2, -1)))
    assert torch.allclose(unit.weights["1"], function.weights["1"], rtol=1e-12)


class Fails(camlens.SimilarityTarget):
    def score(self, output, rows):
        raise ValueError("no embedding here")


def test_a_failing_score_target_is_named_by_its_repr():
    with pytest.raises(CamlensError) as error:
        camlens.GradCAM(Head().eval(), "relu")(pictures(1), Fails(torch.ones(3)))
    assert str(error.value) == ("the target SimilarityTarget(reference of shape (3,)) failed on the model's output "
                                "of shape (1, 3): ValueError: no embedding here")


# -- the engine's own records ---------------------------------------------------------------------------

def test_an_explanation_records_its_method_units_and_one_target_row_per_image():
    model, x = dense(), pictures(2).double()  # 2 images, 3 input channels
    unit = UnitTarget("2", 1)
    expl = camlens.GradCAM(model, "1")(x, unit)
    assert expl.method == "gradcam" and expl.units == (unit,)
    assert torch.equal(expl.targets, torch.full((2, 1), -1))
    function = camlens.ScoreCAM(model, "1")(x, lambda out: out[:, 0].mean(dim=(-2, -1)))
    assert function.method == "scorecam" and function.targets.shape == (2, 1)


def test_a_blank_map_warning_points_at_the_callers_line():
    model = Head().eval()
    with torch.no_grad():
        model.fc.weight.fill_(-1.0)  # every channel's weight negative: blank Grad-CAM maps
    from camlens.errors import BlankMapWarning

    with pytest.warns(BlankMapWarning) as record:
        camlens.GradCAM(model, "relu")(pictures(1), 0)
    # The caller's line, not camlens's own (under mutmut a trampoline stands between the two).
    assert not record[0].filename.startswith(os.path.dirname(camlens.__file__))


class Buffered(nn.Module):
    """No parameters, two buffers: an int64 counter and a weight of ``dtype``, in that order or
    the other."""

    def __init__(self, dtype, counter_first):
        super().__init__()
        weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(16)).to(dtype)
        if counter_first:
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("weight", weight)
        if not counter_first:
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x).mean(dim=(2, 3)) @ self.weight


@pytest.mark.parametrize("dtype, counter_first, expected", [
    (torch.float64, False, torch.float64),  # the first buffer is floating point: the images follow it
    (torch.float32, True, torch.float32),  # the first is a counter: the images keep their own type
])
def test_a_model_without_parameters_sets_the_images_type_by_its_first_buffer(dtype, counter_first, expected):
    x = torch.rand(2, 3, 4, 4)  # float32
    expl = camlens.GradCAM(Buffered(dtype, counter_first), "relu")(x, 1)
    assert expl.scores.dtype == expected


def test_the_default_layer_search_runs_the_first_image_with_its_own_inputs():
    x, shifts = pictures(2), camlens.PerImage(torch.tensor([0.0, 0.5]).view(2, 1, 1, 1))
    default = camlens.GradCAM(Keyed().eval())(x, 1, forward_kwargs={"shift": shifts}, images_as="pixel_values")
    named = camlens.GradCAM(Keyed().eval(), "net.relu")(x, 1, forward_kwargs={"shift": shifts},
                                                         images_as="pixel_values")
    assert default.target_layers == ("net.relu",) and torch.allclose(default.maps, named.maps)


def test_an_explanation_records_the_output_layout_and_forward_inputs_it_used():
    pair = Pair().eval()
    assert camlens.GradCAM(pair, "net.relu", output=1)(pictures(1), 0).options["output"] == 1
    picked = camlens.GradCAM(pair, "net.relu", output=lambda out: out[1])(pictures(1), 0).options["output"]
    assert picked == "test_an_explanation_records_the_output_layout_and_forward_inputs_it_used.<locals>.<lambda>"
    tokens = camlens.GradCAM(Tokens(False).double().eval(), "block", reshape="tokens:1:2x3")(
        torch.rand(1, 3, 4, 6, dtype=torch.float64), 0)
    assert tokens.options["reshape"] == "tokens:1:2x3"
    keyed = camlens.GradCAM(Keyed().eval(), "net.relu")(
        pictures(2), 0, forward_kwargs={"shift": camlens.PerImage(torch.zeros(2, 1, 1, 1))}, images_as="pixel_values")
    assert keyed.options["forward inputs"] == "images as pixel_values; shift: per image (2, 1, 1, 1)"


@pytest.mark.parametrize("model, output, message", [
    ("net", None, "model must be a torch.nn.Module, not str"),
    (None, [1], "output must be None (automatic), an int (an index), a str (a key or attribute) or a function "
                "of the model's output, not list"),
    (None, True, "output must be None (automatic), an int (an index), a str (a key or attribute) or a function "
                 "of the model's output, not bool"),
])
def test_a_method_refuses_what_is_not_a_model_or_an_output_selector(model, output, message):
    with pytest.raises(CamlensError) as error:
        camlens.GradCAM(Head().eval() if model is None else model, "relu" if model is None else None, output=output)
    assert str(error.value) == message


# -- the passes that score versions of the images ----------------------------------------------------------

class TokensOut(nn.Module):
    """Patch embedding with a ReLU [a 4-D target layer] -> tokens (N, 1 + 6, 5) -> a linear block, whose
    tokens the model returns beside pooled class scores, in a dict with no ``logits`` key."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(16)
        self.patch = nn.Sequential(nn.Conv2d(3, 5, 2, stride=2), nn.ReLU())
        self.cls = nn.Parameter(torch.randn(1, 1, 5))
        self.block = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        out = self.block(torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1))
        return {"pooled": self.head(out.mean(dim=1)), "tokens": out}


@pytest.mark.parametrize("name", ["scorecam", "smoothgradcam++"])
@pytest.mark.parametrize("optimize", [False, True])
def test_a_unit_on_a_token_layer_scores_its_grid_in_every_pass(name, optimize):
    """A unit of a layer of tokens is read on the layer's grid (``reshape``: the class token
    dropped, the 6 patches as 2x3) in the passes over masked or noisy copies too, on the model
    that runs (the inference copy with ``optimize``), whatever ``output`` picks for the class
    scores: the function reading the same tokens off the model's output gives the same weights."""
    from camlens.accelerate import inference_copy

    model = TokensOut().double().eval()
    x = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    assert inference_copy(model, x) is not None
    options = {"seed": 0, "n_samples": 3, "noise_level": 0.2} if name == "smoothgradcam++" else {}
    unit = camlens.METHODS[name](model, "patch", reshape="tokens:1:2x3", output="pooled", optimize=optimize,
                                 **options)(x, UnitTarget("block", 0))
    function = camlens.METHODS[name](model, "patch", output="tokens", **options)(
        x, lambda out: out[:, 1:, 0].mean(dim=1))
    assert torch.allclose(unit.weights["patch"], function.weights["patch"], rtol=1e-9, atol=1e-12)
    assert unit.weights["patch"].abs().max() > 0


class Joined(nn.Module):
    """Pooled features joined to a per-image vector ``extra`` (N, 2): the model cannot broadcast
    one image against two rows of ``extra``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(18)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, x, extra):
        return self.head(torch.cat([self.features(x).mean(dim=(2, 3)), extra], dim=1))


class JoinedBound(nn.Module):
    def __init__(self, model, extra):
        super().__init__()
        self.model, self.extra = model, extra

    def forward(self, x):
        return self.model(x, self.extra.expand(x.shape[0], -1))


def test_two_images_share_the_all_zero_input_but_not_their_forward_inputs():
    """Score-CAM's ``baseline="zeros"`` forwards one all-zero input for every image: with a
    forward input of one row per image, it is forwarded once per image, with that image's row,
    also for two images. Each image explained alone with its row bound in gives the same."""
    model, x = Joined().double().eval(), pictures(2).double()
    extra = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    got = camlens.ScoreCAM(model, "features", baseline="zeros")(x, [0, 2], forward_args=(camlens.PerImage(extra),))
    for i, target in enumerate([0, 2]):
        alone = camlens.ScoreCAM(JoinedBound(model, extra[i : i + 1]), "model.features", baseline="zeros")(
            x[i : i + 1], target)
        assert torch.allclose(got.weights["features"][i], alone.weights["model.features"][0], rtol=1e-10)


class AtMostTwo(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(19)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] > 2:
            raise ValueError("at most 2 images at a time")
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["scorecam", "smoothgradcam++"])
def test_a_model_failing_on_a_batch_of_versions_is_reported_in_one_line(name):
    """The model runs on one image, then fails on a batch of 4 masked (Score-CAM) or noisy
    (Smooth Grad-CAM++) copies: the error names the input it failed on and the model's reason."""
    options = {"seed": 0, "n_samples": 4} if name == "smoothgradcam++" else {}
    with pytest.raises(CamlensError) as error:
        camlens.METHODS[name](AtMostTwo().double().eval(), "features", batch_size=4, **options)(pictures(1).double(), 0)
    assert str(error.value) == ("the model failed on an input of shape (4, 3, 6, 6): ValueError: at most 2 images "
                                "at a time (check the input's shape and preprocessing, or the model)")


def test_the_output_picked_reaches_every_forward_the_method_runs():
    """``output=`` picks the class scores in a dict with no ``logits`` key, in the method's own
    passes and in the forward it lends the metrics (``fast_forward``), on the model or on its
    inference copy; with ``optimize`` that forward runs the copy, not the model."""
    model = TokensOut().double().eval()
    x = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)["pooled"]
    weights = []
    for optimize in (False, True):
        method = camlens.ScoreCAM(model, "patch", output="pooled", optimize=optimize)
        forward = method.fast_forward(x)
        calls = []
        handle = model.register_forward_hook(lambda *args: calls.append(1))
        try:
            with torch.no_grad():
                assert torch.allclose(forward(x), expected, rtol=1e-10)
        finally:
            handle.remove()
        assert len(calls) == (0 if optimize else 1)
        weights.append(method(x, [0, 2]).weights["patch"])
    assert torch.allclose(weights[0], weights[1], rtol=1e-9, atol=1e-12)


def test_images_take_the_dtype_of_the_models_parameters_or_else_its_buffers():
    """Float images given to a float64 model are explained in float64: the dtype comes from the
    first parameter, else (a model with buffers only) from the first buffer; a model with
    neither takes the images as they are. A channel's mean as its class score: Grad-CAM's weight
    is 1/(h w) for that channel, 0 for the others."""
    torch.manual_seed(21)
    weighted = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3)).double().eval()
    assert next(weighted.buffers(), None) is None
    x = pictures(2)
    got = camlens.GradCAM(weighted, "1")(x, [0, 2])
    assert got.weights["1"].dtype == torch.float64
    assert torch.allclose(got.weights["1"], camlens.GradCAM(weighted, "1")(x.double(), [0, 2]).weights["1"])

    class Buffered(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mix", torch.eye(3, dtype=torch.float64))
            self.relu = nn.ReLU()

        def forward(self, x):
            return torch.einsum("nchw,dc->nd", self.relu(x), self.mix) / (x.shape[2] * x.shape[3])

    pooled = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    for model, layer, dtype in ((Buffered(), "relu", torch.float64), (pooled, "0", torch.float32)):
        expl = camlens.GradCAM(model, layer)(x, [1, 2])
        assert expl.weights[layer].dtype == dtype
        expected = torch.zeros(2, 3, dtype=dtype)
        expected[0, 1] = expected[1, 2] = 1 / 36
        assert torch.allclose(expl.weights[layer].reshape(2, 3), expected)
