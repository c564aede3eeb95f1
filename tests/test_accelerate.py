"""The inference copy (camlens.accelerate): folded batch norms, channels-last, compiled forwards.

Every fast path is checked against the plain computation (the model itself, optimize=False):
exact up to float rounding, 1e-5 on maps, and only where the copy is valid.
"""

from __future__ import annotations

import copy
import gc
import os
import threading
import weakref

import pytest
import torch
from torch import nn

import camlens
from camlens.accelerate import CompiledForward, InferenceCopies, inference_copy
from camlens.capture import preserved
from camlens.errors import CamlensError
from camlens.evaluate import evaluate_image
from conftest import make_tiny

METHODS = ["cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam"]


def plain_and_fast(method, model, images, **options):
    extra = {"seed": 0} if method == "smoothgradcam++" else {}
    fast = camlens.explain(model, images, method, "features", optimize=True, **extra, **options)
    plain = camlens.explain(model, images, method, "features", optimize=False, **extra, **options)
    return fast, plain


@pytest.mark.parametrize("method", METHODS)
def test_maps_equal_the_plain_model(method, images):
    model = make_tiny(dtype=torch.float32)
    x = images.float()
    fast, plain = plain_and_fast(method, model, x)
    assert (fast.maps - plain.maps).abs().max() <= 1e-5
    assert torch.allclose(fast.scores, plain.scores, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast.logits, plain.logits, atol=1e-5, rtol=1e-5)
    assert fast.maps.is_contiguous()


def expected_fold(model, x):
    """BN(conv(x)) by hand from the batch norm's formula, for the tiny model's first pair."""
    conv, norm = model.features[0], model.features[1]
    y = conv(x)
    shape = (1, -1, 1, 1)
    return (y - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)


def test_folds_each_conv_batch_norm_pair_and_keeps_names(images):
    model = make_tiny()
    with torch.no_grad():
        nn.init.uniform_(model.features[1].weight, 0.5, 2.0)
        nn.init.uniform_(model.features[1].bias, -1.0, 1.0)
    with preserved(model):
        made = inference_copy(model, images)
        assert made is not None and made.folded == {"features.0", "features.3"}
        assert made.channels_last
        assert isinstance(made.module.features[1], nn.Identity) and isinstance(made.module.features[4], nn.Identity)
        assert isinstance(model.features[1], nn.BatchNorm2d)  # the model itself is untouched
        with torch.no_grad():
            assert torch.allclose(made.module.features[0](images), expected_fold(model, images), atol=1e-12)
            assert torch.allclose(made.module(made.prepare(images)), model(images), atol=1e-12)
        assert not any(p.requires_grad for p in made.module.parameters())


def test_copy_is_remembered_and_remade_when_the_model_changes(images):
    model, copies = make_tiny(), InferenceCopies()
    first = copies.get(model, images)
    assert first is not None and copies.get(model, images) is first
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(images).sum().backward()  # also updates the batch norms' running statistics
    optimizer.step()
    model.eval()
    second = copies.get(model, images)
    assert second is not first
    with torch.no_grad():
        assert torch.allclose(second.module(second.prepare(images)), model(images), atol=1e-12)
    model.fc = nn.Linear(8, 5).double()  # a replaced module
    third = copies.get(model, images)
    assert third is not second
    with torch.no_grad():
        assert torch.allclose(third.module(third.prepare(images)), model(images), atol=1e-12)


def test_a_method_object_reuses_its_copy_and_keeps_nothing_alive(images):
    model = make_tiny()
    method = camlens.GradCAM(model, "features", optimize=True)
    method(images)
    made = method._copies.get(model, images)
    method(images[:2])
    assert method._copies.get(model, images) is made  # another batch size: the same copy
    alive = weakref.ref(model)
    del model, method, made
    gc.collect()
    assert alive() is None


class SharedConvOutput(nn.Module):
    """The convolution's output feeds its batch norm and a skip: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.features = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(self.features(self.bn(y) + y).mean(dim=(2, 3)))


class ReluBetween(nn.Module):
    """conv -> ReLU(inplace) -> BN: the batch norm's input is the conv's tensor, changed in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.features = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(self.act(self.conv(x))).mean(dim=(2, 3)))


def with_statistics(model):
    torch.manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 2.0)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.eval()


def test_a_fold_that_would_change_the_model_is_refused(images):
    model = with_statistics(SharedConvOutput()).double()
    with preserved(model):
        assert inference_copy(model, images) is None  # the verification caught the skip
    fast = camlens.explain(model, images, "gradcam", "features", optimize=True)
    plain = camlens.explain(model, images, "gradcam", "features", optimize=False)
    assert torch.equal(fast.maps, plain.maps)


def test_a_batch_norm_after_an_in_place_change_is_not_folded(images):
    model = with_statistics(ReluBetween()).double()
    with preserved(model):
        made = inference_copy(model, images)
    assert made is not None and made.folded == frozenset()
    fast, plain = plain_and_fast("gradcam", model, images)
    assert (fast.maps - plain.maps).abs().max() <= 1e-10


def test_a_hook_that_changes_the_model_refuses_the_copy(images):
    model = make_tiny()
    handle = model.features[2].register_forward_hook(lambda m, i, o: o * 2 + 1)
    try:
        with preserved(model):
            assert inference_copy(model, images) is None
        fast, plain = plain_and_fast("gradcam", model, images)
        assert torch.equal(fast.maps, plain.maps)
    finally:
        handle.remove()


def test_a_model_that_cannot_be_copied_runs_as_it_is(images):
    model = make_tiny()
    model.lock = threading.Lock()  # deepcopy cannot copy a lock
    with pytest.raises(TypeError):
        copy.deepcopy(model)
    with preserved(model):
        assert inference_copy(model, images) is None
    fast, plain = plain_and_fast("gradcam++", model, images)
    assert torch.equal(fast.maps, plain.maps)


def test_observing_a_folded_convolution_uses_the_model_itself(images):
    model = make_tiny()
    fast = camlens.explain(model, images, "gradcam", "features.0", optimize=True)
    plain = camlens.explain(model, images, "gradcam", "features.0", optimize=False)
    assert torch.equal(fast.maps, plain.maps)  # not the folded conv's output: the model's own
    unit = camlens.UnitTarget("features.3", 1)
    fast = camlens.explain(model, images, "gradcam", "features.1", unit, optimize=True)
    plain = camlens.explain(model, images, "gradcam", "features.1", unit, optimize=False)
    assert torch.equal(fast.maps, plain.maps)


def test_a_model_in_training_mode_is_restored_and_explained_in_eval_mode(images):
    model = make_tiny().train()
    fast = camlens.explain(model, images, "gradcam", "features", optimize=True)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    plain = camlens.explain(model, images, "gradcam", "features", optimize=False)
    assert (fast.maps - plain.maps).abs().max() <= 1e-10


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_engine_options(images, value):
    model = make_tiny()
    with pytest.raises(CamlensError, match="optimize must be True or False"):
        camlens.GradCAM(model, optimize=value)
    with pytest.raises(CamlensError, match="compile must be True or False"):
        camlens.GradCAM(model, compile=value)
    assert camlens.GradCAM(model, compile=True).optimize  # compiling runs the copy
    assert not camlens.GradCAM(model).optimize  # the library runs the model itself unless asked


class Identity(nn.Module):
    """Stands in for torch.compile: the padding and batching around it are what is tested."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __call__(self, module):
        def run(x):
            self.shapes.append(tuple(x.shape))
            return module(x)

        return run


def test_compiled_forward_pads_to_one_batch_shape(images, monkeypatch):
    model = make_tiny()
    fake = Identity()
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: fake(module))
    x = torch.randn(7, 3, 12, 12, dtype=torch.float64)
    with preserved(model):
        made = inference_copy(model, x)
        forward = CompiledForward(made, batch=3)
        with torch.no_grad():
            got = forward(x)
            expected = model(x)
    assert fake.shapes == [(3, 3, 12, 12)] * 3  # 3 + 3 + 1 padded to 3
    assert torch.allclose(got, expected, atol=1e-12)


def test_compile_cache_goes_to_the_users_cache_folder_unless_chosen(monkeypatch, tmp_path):
    from camlens.accelerate import _persistent_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _persistent_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "camlens" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen")
    _persistent_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen"


def test_compiled_scorecam_and_metrics_equal_the_plain_ones(images, monkeypatch, tmp_path):
    """A real torch.compile (inductor) of the tiny model: Score-CAM's masked inputs and the
    metrics' perturbed inputs through it give the plain numbers."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = make_tiny(dtype=torch.float32)
    x = images.float()
    fast = camlens.explain(model, x, "scorecam", "features", compile=True, batch_size=4)
    plain = camlens.explain(model, x, "scorecam", "features", optimize=False, batch_size=4)
    assert (fast.maps - plain.maps).abs().max() <= 1e-5
    metrics = ["drop", "increase", "deletion", "insertion"]
    compiled = evaluate_image(camlens.GradCAM(model, "features", compile=True), x[0], 1, [], metrics, steps=5, batch_size=4)
    slow = evaluate_image(camlens.GradCAM(model, "features", optimize=False), x[0], 1, [], metrics, steps=5, batch_size=4)
    for key in ("probability", "explained_probability", "drop", "deletion", "insertion"):
        assert compiled[key] == pytest.approx(slow[key], abs=1e-5)
    assert compiled["increase"] == slow["increase"]
    assert compiled["deletion_curve"] == pytest.approx(slow["deletion_curve"], abs=1e-5)


def test_evaluate_with_the_copy_equals_the_plain_model(images):
    model = make_tiny()
    metrics = ["drop", "increase", "deletion", "insertion"]
    fast = evaluate_image(camlens.GradCAMPlusPlus(model, "features"), images[0], 2, [], metrics, steps=7, batch_size=5)
    plain = evaluate_image(camlens.GradCAMPlusPlus(model, "features", optimize=False), images[0], 2, [], metrics,
                           steps=7, batch_size=5)
    assert fast.keys() == plain.keys()
    for key, value in plain.items():
        assert fast[key] == pytest.approx(value, abs=1e-10), key
