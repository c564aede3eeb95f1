"""A method never changes the model: parameters, buffers, hooks, modes and flags."""

from __future__ import annotations

import copy

import pytest
import torch

import camlens
from camlens import CamlensError

from conftest import make_tiny

OPTIONS = {"smoothgradcam++": {"n_samples": 3, "seed": 0}, "scorecam": {"batch_size": 4}}


def snapshot(model):
    return {
        "state": copy.deepcopy(model.state_dict()),
        "modes": {name: m.training for name, m in model.named_modules()},
        "flags": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "hooks": {
            name: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for name, m in model.named_modules()
        },
    }


def assert_same(before, after):
    assert before["modes"] == after["modes"]
    assert before["flags"] == after["flags"]
    assert before["hooks"] == after["hooks"]
    assert all(g is None for g in after["grads"].values())
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def mixed_model():
    """Train mode with one submodule in eval mode, and one frozen parameter."""
    model = make_tiny().train()
    model.features[1].eval()
    model.fc.bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", list(camlens.list_methods()))
def test_model_unchanged_after_success(method, images):
    model = mixed_model()
    before = snapshot(model)
    camlens.explain(model, images, method, targets=camlens.TopK(2), **OPTIONS.get(method, {}))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", list(camlens.list_methods()))
def test_model_unchanged_after_error(method, images):
    model = mixed_model()
    before = snapshot(model)
    with pytest.raises(CamlensError, match="out of range"):
        camlens.explain(model, images, method, targets=99, **OPTIONS.get(method, {}))
    assert_same(before, snapshot(model))


def test_model_unchanged_when_the_model_itself_raises(images):
    model = mixed_model()
    before = snapshot(model)

    def boom(module, inputs, output):
        raise RuntimeError("user hook failed")

    handle = model.fc.register_forward_hook(boom)
    before["hooks"]["fc"] = (1, 0, 0, 0)
    with pytest.raises(CamlensError, match="the model failed on an input of shape .*RuntimeError: user hook failed"):
        camlens.GradCAM(model, "features")(images)
    assert_same(before, snapshot(model))
    handle.remove()


def test_explained_in_eval_mode(images):
    """A model left in train mode is explained as in eval mode: dropout off, running stats used."""
    model = make_tiny()
    expected = camlens.GradCAM(model, "features")(images)
    got = camlens.GradCAM(model.train(), "features")(images)
    torch.testing.assert_close(got.maps, expected.maps, rtol=0, atol=0)
    assert model.training


def test_input_not_modified_and_no_grad_left(images):
    model = make_tiny()
    original = images.clone()
    result = camlens.explain(model, images, "gradcam++")
    assert torch.equal(images, original)
    assert not images.requires_grad
    for tensor in [result.maps, result.scores, *result.raw.values(), *result.weights.values()]:
        assert not tensor.requires_grad
