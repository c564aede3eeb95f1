"""Issue 7 in the Python API: subpackages reachable from ``import camlens``, and hostile input
answered by one CamlensError that says what to do, with the model left as it was."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens import CamlensError, TopK, UnitTarget
from camlens import metrics

from conftest import make_tiny
from test_model_untouched import assert_same, mixed_model, snapshot

METHODS = list(camlens.list_methods())
OPTIONS = {"smoothgradcam++": {"n_samples": 2, "seed": 0}, "scorecam": {"batch_size": 4}}


def raises(match):
    return pytest.raises(CamlensError, match=match)


# -- point 8: subpackages from a bare `import camlens`, torch still loaded lazily -------------

FRESH_IMPORTS = """
import importlib, pkgutil, sys
import camlens
assert "torch" not in sys.modules, "import camlens alone loaded torch"
model = camlens.models.efficientnet_lite0(pretrained=False)
assert type(model).__name__ == "EfficientNetLite0"
names = sorted(m.name for m in pkgutil.iter_modules(camlens.__path__) if not m.name.startswith("_"))
for name in names:
    # A fresh camlens for each name, so that no earlier import makes the attribute exist.
    for key in [k for k in sys.modules if k == "camlens" or k.startswith("camlens.")]:
        del sys.modules[key]
    fresh = importlib.import_module("camlens")
    assert getattr(fresh, name) is sys.modules["camlens." + name], name
    assert name in dir(fresh), name
print(" ".join(names))
"""


def test_subpackages_are_attributes_of_a_bare_import():
    done = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reached = set(done.stdout.split())
    assert {"models", "metrics", "methods", "datasets", "render", "io", "evaluate"} <= reached
    assert "cli" in reached and "__main__" not in reached


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        camlens.nonexistent
    assert not hasattr(camlens, "_entry")  # private modules are not exported


# -- point 10: the model's forward fails on the input -----------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("channels", [1, 4])
def test_wrong_channel_count_names_the_expected_shape(method, channels, images):
    model = mixed_model()
    before = snapshot(model)
    wrong = torch.randn(3, channels, 12, 12, dtype=torch.float64)
    message = rf"the model expects \(N, 3, H, W\) images, got \(N, {channels}, 12, 12\): convert"
    with raises(message) as caught:
        camlens.explain(model, wrong, method, **OPTIONS.get(method, {}))
    assert isinstance(caught.value.__cause__, RuntimeError)  # the model's own error stays attached
    assert_same(before, snapshot(model))
    with raises(message):  # a named target layer: the failure comes from the clean forward
        camlens.explain(model, wrong, method, target_layer="features", **OPTIONS.get(method, {}))
    assert_same(before, snapshot(model))


def test_channels_last_images_get_the_permute_hint(tiny, images):
    with raises(r"got \(N, 12, 12, 3\): the images look channels-last: use images.permute\(0, 3, 1, 2\)"):
        camlens.explain(tiny, images.permute(0, 2, 3, 1))


class Fails(nn.Module):
    """A model without a convolution to read the expected channels from, that raises."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        raise self.error


def test_other_model_failures_are_one_line_with_the_input_shape(images):
    model = Fails(ValueError("boom\nsecond line"))
    with raises(r"^the model failed on an input of shape \(3, 3, 12, 12\): ValueError: boom \(check"):
        camlens.GradCAM(model, "linear")(images)
    with raises(r"input of shape \(1, 3, 12, 12\): ValueError: boom"):  # the default-layer search
        camlens.GradCAM(model)(images[:1])


def test_interrupts_are_not_turned_into_errors(images):
    with pytest.raises(KeyboardInterrupt):
        camlens.GradCAM(Fails(KeyboardInterrupt()), "linear")(images)


def test_too_small_images_report_the_models_error(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).double()
    with raises(r"input of shape \(2, 3, 3, 3\): RuntimeError: .*Kernel size can't be greater"):
        camlens.explain(model, images[:2, :, :3, :3], target_layer="1")


# -- point 10: an integer target layer names an nn.Sequential child ----------------------------

SEQUENTIAL = nn.Sequential(
    nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    nn.Flatten(), nn.Linear(5, 2),
).double()


def test_an_int_target_layer_is_the_child_of_that_name(images):
    by_name = camlens.GradCAM(SEQUENTIAL, "3")(images)
    by_int = camlens.GradCAM(SEQUENTIAL, 3)(images)
    assert by_int.target_layers == ("3",)
    torch.testing.assert_close(by_int.maps, by_name.maps, rtol=0, atol=0)
    fused = camlens.explain(SEQUENTIAL, images, target_layer=[1, "3"], channels={3: [0, 2]})
    assert fused.target_layers == ("1", "3") and fused.channels == {"3": [0, 2]}
    unit = camlens.explain(SEQUENTIAL, images, target_layer=1, targets=UnitTarget(3, channel=4))
    torch.testing.assert_close(unit.scores[:, 0], SEQUENTIAL[:4](images)[:, 4].mean(dim=(1, 2)))


def test_bad_target_layer_types(tiny):
    with raises(r"unknown layer '3'; closest: features\.3"):
        camlens.GradCAM(tiny, 3)
    for layer, kind in ((3.0, "float"), (True, "bool"), ({"features": 1}, "dict")):
        with raises(rf"a layer is a module name \(str, or int for an nn.Sequential child\), .*not {kind}$"):
            camlens.GradCAM(tiny, layer)


# -- point 10: Smooth Grad-CAM++'s noise ------------------------------------------------------


@pytest.mark.parametrize("level", [math.inf, -math.inf, math.nan, -0.1, True, "0.1"])
def test_noise_level_must_be_finite_and_not_negative(tiny, level):
    with raises(r"noise_level must be a finite number >= 0"):
        camlens.SmoothGradCAMPlusPlus(tiny, noise_level=level)


class InfiniteOffGrid(nn.Module):
    """The tiny model, with an infinite logit for every input whose first pixel is neither 0 nor 1."""

    def __init__(self):
        super().__init__()
        self.net = make_tiny()

    def forward(self, x):
        first = x[:, :1, 0, 0]
        return self.net(x) + torch.where((first != 0) & (first != 1), math.inf, 0.0)


def test_a_failing_noisy_copy_is_reported_by_its_image_index():
    """Images 0 and 1 are all zeros (range 0, so their noisy copies and masked inputs stay 0);
    every noisy copy of image 2, and its masked inputs, fail. Copies are forwarded two at a
    time, so image 2's are rows 0 and 1 of the last batch: the message must say image 2."""
    torch.manual_seed(0)
    images = torch.zeros(3, 3, 12, 12, dtype=torch.float64)
    images[2] = torch.randn(3, 12, 12, dtype=torch.float64)
    images[2, 0, 0, 0] = 1.0
    model = InfiniteOffGrid()
    before = snapshot(model)
    method = camlens.SmoothGradCAMPlusPlus(model, "net.features", n_samples=2, batch_size=2, seed=0)
    with raises(r"non-finite target scores of noisy copies \(NaN or inf\) for image\(s\) \[2\]:"):
        method(images)
    assert_same(before, snapshot(model))
    # Score-CAM names images the same way when a masked input fails.
    with raises(r"non-finite target scores of masked or baseline inputs \(NaN or inf\) for image\(s\) \[2\]:"):
        camlens.ScoreCAM(model, "net.features", batch_size=3)(images)


def test_noise_that_overflows_names_the_images(images):
    model = make_tiny(dtype=torch.float32)
    with raises(r"noise_level 1e\+38 makes noisy copies of image\(s\) \[0, 1, 2\] overflow torch.float32"):
        camlens.explain(model, images.float(), "smoothgradcam++", noise_level=1e38, seed=0)


# -- point 10: empty targets, and the rest of the hostile inputs -------------------------------


@pytest.mark.parametrize("targets", [[], [[], [], []], torch.empty(0, dtype=torch.long),
                                     camlens.ClassTarget([])])
def test_empty_targets(targets, images):
    with raises(r"the targets are empty \(shape \((0,|3, 0)\)\): give one class per image"):
        camlens.explain(make_tiny(), images, targets=targets)


def tuple_model():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mixed_model()

        def forward(self, x):
            return self.net(x), x  # two tensors: which one to explain is ambiguous

    return Pair()


def vector_model():
    class Vector(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mixed_model()

        def forward(self, x):
            return self.net(x)[0]

    return Vector()


HOSTILE = {
    "integer images": (dict(images=lambda x: x.long()), r"images must be a float tensor after preprocessing, got torch.int64"),
    "6-D images": (dict(images=lambda x: x[None, None]), r"images must have shape \(N, C, H, W\) or \(C, H, W\), or be "
                   r"\(N, C, L\) signals or \(N, C, D, H, W\) volumes or clips, got \(1, 1, 3, 3, 12, 12\)"),
    # A clip (N, C, T, H, W) goes to the model: one that runs frames through a 2-D backbone takes it, an image model says.
    "5-D images to an image model": (dict(images=lambda x: x[None]), r"the model failed on an input of shape "
                                     r"\(1, 3, 3, 12, 12\): RuntimeError: Expected 3D \(unbatched\) or 4D"),
    "empty batch": (dict(images=lambda x: x[:0]), r"images of shape \(0, 3, 12, 12\) hold no pixels"),
    "empty image": (dict(images=lambda x: x[:, :, :0]), r"images of shape \(3, 3, 0, 12\) hold no pixels"),
    "NaN image": (dict(images=lambda x: torch.where(torch.arange(3)[:, None, None, None] == 2, math.nan, x)),
                  r"non-finite input images \(NaN or inf\) for image\(s\) \[2\]"),
    "float64 overflowing float32": (dict(images=lambda x: x * 1e300, model=lambda: mixed_model().float()),
                                    r"non-finite input images"),
    "channel out of range": (dict(channels=[0, 8]), r"channel 8 is out of range: layer 'features' has 8 channels"),
    "boolean channels": (dict(channels=[True, False]), r"a channel subset is a non-empty list of integer channel indices"),
    "TopK beyond classes": (dict(targets=TopK(6)), r"top-6 asked for, but the model has only 5 classes"),
    "unit channel out of range": (dict(targets=UnitTarget("features", 8)), r"unit channel 8 is out of range"),
    "unit negative channel": (dict(targets=UnitTarget("features", -1)), r"unit channel -1 is out of range"),
    "unit position outside": (dict(targets=UnitTarget("features", 1, (6, 0))), r"unit position \(6, 0\) is outside"),
    "unit layer unknown": (dict(targets=UnitTarget("featurs", 1)), r"unknown layer 'featurs'; closest: features"),
    "progress not callable": (dict(progress=3), r"progress must be a function progress\(done, total\), not int"),
    "model returns a tuple": (dict(model=tuple_model, target_layer="net.features"),
                              r"the model returned tuple; camlens needs class scores of shape \(3, classes\)"),
    "model returns a vector": (dict(model=vector_model, target_layer="net.features"),
                               r"the model returned a tensor of shape \(5,\); camlens needs class scores"),
}


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_raise_one_clear_error_and_leave_the_model(case, method, images):
    given, message = HOSTILE[case]
    model = given.get("model", mixed_model)()
    before = snapshot(model)
    x = given.get("images", lambda x: x)(images)
    target_layer = given.get("target_layer", "features")
    with raises(message):
        camlens.explain(model, x, method, target_layer=target_layer, targets=given.get("targets"),
                        channels=given.get("channels"), progress=given.get("progress"))
    assert_same(before, snapshot(model))


def test_one_image_without_a_batch_dimension(tiny, images):
    one = camlens.explain(tiny, images[1])
    torch.testing.assert_close(one.maps, camlens.explain(tiny, images[1:2]).maps, rtol=0, atol=0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: TopK(0), r"top-k needs a positive integer k, got 0"),
        (lambda m: TopK(1.0), r"top-k needs a positive integer k, got 1.0"),
        (lambda m: UnitTarget("features", "3"), r"a unit's channel is an integer index, got '3'"),
        (lambda m: UnitTarget("features", 1, (1, 2, 3, 4)), r"a unit's position is None or a pair of integers"),
        (lambda m: camlens.GradCAM(m, nn.Conv2d(3, 8, 1)), r"is not a submodule of the model"),
        (lambda m: camlens.ScoreCAM(m, batch_size=-1), r"batch_size must be a positive integer, got -1"),
        (lambda m: camlens.ScoreCAM(m, channel_softmax="no"), r"channel_softmax must be True or False"),
        (lambda m: camlens.SmoothGradCAMPlusPlus(m, n_samples=0), r"n_samples must be a positive integer"),
        (lambda m: camlens.SmoothGradCAMPlusPlus(m, seed="1"), r"seed must be an integer"),
        (lambda m: camlens.SmoothGradCAMPlusPlus(m, generator=1), r"generator must be a torch.Generator, not int"),
    ],
)
def test_bad_arguments_to_the_building_blocks(build, message):
    model = mixed_model()
    before = snapshot(model)
    with raises(message):
        build(model)
    assert_same(before, snapshot(model))


def test_unit_positions_may_be_lists(tiny, images):
    unit = UnitTarget("features", 1, [2, 3])
    assert unit.position == (2, 3) and hash(unit) == hash(UnitTarget("features", 1, (2, 3)))
    result = camlens.explain(tiny, images, target_layer="features.3", targets=unit)
    torch.testing.assert_close(result.scores[:, 0], tiny.features(images)[:, 1, 2, 3])


# -- the metrics: the same faults ---------------------------------------------------------------


def test_metrics_refuse_bad_shapes_and_values(tiny, images):
    maps = torch.rand(3, 12, 12, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2])
    with raises(r"maps must have shape \(3, 12, 12\) \(one map per image.*explanation.maps\[:, t\]\), got \(3, 1, 12, 12\)"):
        metrics.drop_and_increase(tiny, images, maps[:, None], classes)
    with raises(r"maps must have shape \(3, 12, 12\)"):
        metrics.deletion_curve(tiny, images, maps[:, :6, :6], classes)
    with raises(r"class 9 is out of range: the model has 5 classes"):
        metrics.class_probabilities(tiny, images, torch.tensor([0, 1, 9]))
    with raises(r"classes must be 3 integer class indices, one per image, got torch.float64"):
        metrics.class_probabilities(tiny, images, classes.double())
    with raises(r"the model expects \(N, 3, H, W\) images, got \(N, 1, 12, 12\)"):
        metrics.class_probabilities(tiny, images[:, :1], classes)
    with raises(r"images must be a non-empty float tensor"):
        metrics.class_probabilities(tiny, images[:0], classes[:0])
    with raises(r"batch_size must be a positive integer, got 0"):
        metrics.class_probabilities(tiny, images, classes, batch_size=0)
    with raises(r"steps must be a positive integer, got 0"):
        metrics.deletion_curve(tiny, images, maps, classes, steps=0)
    with raises(r"kernel_size must be a positive odd integer, got 4"):
        metrics.insertion_curve(tiny, images, maps, classes, kernel_size=4)
    with raises(r"sigma must be a finite number > 0, got 0"):
        metrics.insertion_curve(tiny, images, maps, classes, sigma=0)
    with raises(r"curves must have shape \(N, steps \+ 1\)"):
        metrics.area_under_curve(torch.ones(5))
    with raises(r"masks must have the maps' shape \(3, 12, 12\), got \(1, 12, 12\)"):
        metrics.energy_pointing_game(maps, torch.ones(1, 12, 12, dtype=torch.bool))
    with raises(r"boxes must be a list of 3 lists of boxes"):
        metrics.pointing_game(maps, [[(0, 0, 3, 3)]])
    with raises(r"a box is four finite numbers \(x_min, y_min, x_max, y_max\), got \(0, 0, 3\)"):
        metrics.localisation_correct(maps, [[(0, 0, 3)]] * 3)
    with raises(r"maps must have shape \(N, H, W\)"):
        metrics.localisation_boxes(maps[:, None])


def test_metrics_accept_class_lists_and_array_boxes(tiny, images):
    maps = torch.rand(3, 12, 12, dtype=torch.float64)
    as_list = metrics.drop_and_increase(tiny, images, maps, [0, 1, 2])
    as_tensor = metrics.drop_and_increase(tiny, images, maps, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(as_list["drop"], as_tensor["drop"], rtol=0, atol=0)
    assert int(metrics.box_mask(np.array([[0, 0, 2, 2]]), 4, 4).sum()) == 4
