"""Review of the inference copy (camlens.accelerate): cases where the copy gave other numbers
than the model itself (optimize=False), failed where the model works, or kept the model alive.

Each test compares with the plain computation on a tiny model built here.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import camlens
from camlens.evaluate import evaluate_image
from camlens.metrics.faithfulness import CurvePlan
from conftest import make_tiny


def maps_difference(model, images, method="gradcam", layer="features", **options):
    fast = camlens.explain(model, images, method, layer, optimize=True, **options)
    plain = camlens.explain(model, images, method, layer, optimize=False, **options)
    return float((fast.maps - plain.maps).abs().max())


def test_parameters_changed_through_data_are_not_explained_through_a_stale_copy(images):
    """``p.data.mul_(...).add_(...)`` (an EMA update, pruning masks, old init code) changes the
    values in place without bumping the parameter's version counter."""
    model = make_tiny()
    assert maps_difference(model, images) <= 1e-10  # the copy is made and remembered
    other = make_tiny(seed=5)
    for parameter, new in zip(model.parameters(), other.parameters()):
        parameter.data.mul_(0.5).add_(new.data, alpha=0.5)
    assert maps_difference(model, images) <= 1e-10


def test_a_hook_registered_after_the_copy_was_made_is_honoured(images):
    model = make_tiny()
    assert maps_difference(model, images) <= 1e-10
    handle = model.features[2].register_forward_hook(lambda module, inputs, output: output * 2 + 1)
    try:
        assert maps_difference(model, images) <= 1e-10
    finally:
        handle.remove()


def test_a_convolution_changed_in_place_is_not_explained_through_a_stale_copy(images):
    """Removing a stride in place (for finer maps) changes what the model computes."""
    model = make_tiny()
    assert maps_difference(model, images) <= 1e-10
    model.features[3].stride = (1, 1)
    assert maps_difference(model, images) <= 1e-10


def test_a_parametrized_convolution_is_explained_as_without_the_copy(images):
    """torch.nn.utils.parametrizations (weight norm here) makes ``weight`` a property that the
    fold cannot assign: the model must then run as it is, not fail."""
    model = make_tiny()
    parametrizations.weight_norm(model.features[3])
    assert maps_difference(model, images) <= 1e-10


class MultipleOfThree(nn.Module):
    """Runs on batches of 3, 6, ... images only (the verification forwards one image)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_tiny()

    def forward(self, x):
        if x.shape[0] % 3:
            raise ValueError("batches of a multiple of 3 images only")
        return self.net(x)


def test_a_model_that_fails_on_one_image_is_explained_as_without_the_copy(images):
    assert maps_difference(MultipleOfThree(), images, layer="net.features") <= 1e-10


class Unpadded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["gradcam++", "scorecam"])
def test_blank_image_maps_equal_the_plain_model(method):
    """On a blank image every channel of an unpadded convolution is constant; the copy's
    channels-last convolution leaves some a few ulps uneven, which normalisation stretches to
    [0, 1] (a map 1.0 away from the plain one)."""
    image = torch.full((1, 3, 16, 16), 0.123)
    worst = 0.0
    for seed in range(12):
        torch.manual_seed(seed)
        model = Unpadded().eval()
        norm = model.features[1]
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.1, 3)
            norm.weight.uniform_(-2, 2)
        worst = max(worst, maps_difference(model, image, method))
    assert worst <= 1e-5


class SizeBranch(nn.Module):
    """Larger images also take the convolution's raw output (a skip), which folding changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.features = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        if x.shape[-1] > 16:
            z = z + y
        return self.fc(self.features(z).mean(dim=(2, 3)))


def with_statistics(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
    return model.double().eval()


def test_a_copy_verified_on_small_images_is_not_trusted_for_larger_ones():
    model = with_statistics(SizeBranch())
    torch.manual_seed(1)
    assert maps_difference(model, torch.randn(2, 3, 12, 12, dtype=torch.float64)) <= 1e-10
    assert maps_difference(model, torch.randn(2, 3, 24, 24, dtype=torch.float64)) <= 1e-10


class Skip(nn.Module):
    """A convolution's output feeds its batch norm and a skip: folding changes the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, eps=0.0)
        self.features = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(self.features(self.bn(y) + y).mean(dim=(2, 3)))


def test_float64_verification_refuses_a_fold_that_changes_the_model_slightly():
    """A batch norm within 1.5e-4 of the identity: the wrong fold changes outputs by less than
    the 1e-4 verification tolerance, yet float64 rounding is 1e-16 and the maps move by 4e-5."""
    torch.manual_seed(20)
    model = Skip().double().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(1 - 1.5e-4, 1 + 1.5e-4)
        model.bn.running_mean.uniform_(-2e-5, 2e-5)
    torch.manual_seed(1)
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert maps_difference(model, images) <= 1e-5


class BatchStatistics(nn.Module):
    """A batch norm without running statistics normalises with the batch's own, also in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_compiled_padding_does_not_change_a_model_with_batch_statistics(images, monkeypatch):
    """Zero rows padded into a batch change its statistics: such a model's rows are not
    independent. (torch.compile stands in as the identity: the padding is under test.)"""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    torch.manual_seed(0)
    model = BatchStatistics().double().eval()
    fast = camlens.explain(model, images, "scorecam", "features", compile=True, batch_size=5)
    plain = camlens.explain(model, images, "scorecam", "features", optimize=False, batch_size=5)
    assert (fast.maps - plain.maps).abs().max() <= 1e-10


def test_a_model_with_a_closure_over_itself_is_not_kept_alive(images):
    """A lambda is not deep-copied: the remembered copy's lambda still refers to the model."""

    class Tempered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_tiny()
            self.temperature = lambda: 2.0 if self.training else 1.0

        def forward(self, x):
            return self.body(x) / self.temperature()

    model = Tempered()
    alive = weakref.ref(model)
    camlens.explain(model, images, "gradcam", "body.features", optimize=True)
    del model
    gc.collect()
    assert alive() is None


def test_evaluate_builds_perturbed_inputs_batch_by_batch(images, monkeypatch):
    """All of an image's perturbed inputs at once is (2 * steps + 1) images in memory: 2.6 GB
    for one 224 x 224 image at --steps 1024 (0.25 GB before the inference copy)."""
    built = []
    original = CurvePlan.inputs

    def inputs(self, index):
        built.append(index.numel())
        return original(self, index)

    monkeypatch.setattr(CurvePlan, "inputs", inputs)
    metrics = ["drop", "deletion", "insertion"]
    evaluate_image(camlens.GradCAM(make_tiny(), "features"), images[0], 1, [], metrics, steps=40, batch_size=8)
    assert sum(built) == 2 * 40 and max(built) <= 8
