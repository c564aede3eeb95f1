"""Several threads explaining with one model: every map equals the single-thread map, and the
model's modes and ``requires_grad`` flags end exactly as they were (issue 20, finding 1).

Before the per-model lock, two threads' hooks recorded each other's forward passes (a false
"runs more than once"), and a call that began while another had frozen the model restored it
frozen, in eval mode.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import camlens
from camlens.methods import METHODS

THREADS = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).mean(dim=(2, 3))))


def mixed_model() -> nn.Module:
    """A model in train mode with one submodule in eval mode and one frozen parameter: a state
    that no single train()/eval()/requires_grad_() call would restore."""
    torch.manual_seed(0)
    model = Net().double().train()
    model.features[1].eval()
    model.features[0].bias.requires_grad_(False)
    return model


def state(model: nn.Module) -> tuple:
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()])


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0] == after[0], "a module's train/eval mode changed"
    assert before[1] == after[1], "a parameter's requires_grad changed"
    for a, b in zip(before[2], after[2]):
        assert torch.equal(a, b)
    for a, b in zip(before[3], after[3]):
        assert torch.equal(a, b)


IMAGES = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
# The costly methods get fewer calls per thread; every one still runs on 4 threads at once.
CALLS = {name: 2 if name in ("sscam", "iscam", "gradcam++-general", "smoothgradcam++") else 5 for name in METHODS}
OPTIONS = {"gradcam++-general": {"score": "exp"}, "sscam": {"seed": 0}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shared_method_object_on_four_threads(name):
    model = mixed_model()
    before = state(model)
    method = camlens.get_method(name)(model, "features", **OPTIONS.get(name, {}))
    alone = method(IMAGES, [0, 2]).maps
    assert_same_state(before, state(model))

    def call(_):
        return method(IMAGES, [0, 2]).maps

    with ThreadPoolExecutor(THREADS) as pool:
        maps = list(pool.map(call, range(THREADS * CALLS[name])))
    for each in maps:
        torch.testing.assert_close(each, alone, rtol=0, atol=1e-12)
    assert_same_state(before, state(model))


@pytest.mark.parametrize("name", ["cam", "gradcam", "scorecam", "ablationcam", "reciprocam", "eigencam", "layercam"])
def test_explain_on_four_threads_twenty_calls_each(name):
    """camlens.explain (a new method object per call) from 4 threads, 20 calls each, with the
    default layer found on the way."""
    model = mixed_model()
    before = state(model)
    alone = camlens.explain(model, IMAGES, name, targets=[1, 0]).maps

    def call(_):
        return camlens.explain(model, IMAGES, name, targets=[1, 0]).maps

    with ThreadPoolExecutor(THREADS) as pool:
        maps = list(pool.map(call, range(THREADS * 20)))
    for each in maps:
        torch.testing.assert_close(each, alone, rtol=0, atol=1e-12)
    assert_same_state(before, state(model))


def test_different_methods_interleaved_on_one_model():
    """Threads each running a different method on one model at the same time."""
    model = mixed_model()
    before = state(model)
    names = ["gradcam", "scorecam", "ablationcam", "gradcam++", "eigencam", "hirescam", "reciprocam", "xgradcam"]
    alone = {name: camlens.explain(model, IMAGES, name, targets=[2, 1]).maps for name in names}

    def call(index):
        name = names[index % len(names)]
        return name, camlens.explain(model, IMAGES, name, targets=[2, 1]).maps

    with ThreadPoolExecutor(THREADS) as pool:
        for name, maps in pool.map(call, range(4 * len(names))):
            torch.testing.assert_close(maps, alone[name], rtol=0, atol=1e-12)
    assert_same_state(before, state(model))


def test_an_error_on_one_thread_leaves_the_others_and_the_model_right():
    model = mixed_model()
    before = state(model)
    alone = camlens.explain(model, IMAGES, "gradcam", targets=[0, 1]).maps

    def call(index):
        if index % 3 == 0:
            with pytest.raises(camlens.CamlensError):
                camlens.explain(model, IMAGES, "gradcam", targets=[0, 7])  # no class 7
            return None
        return camlens.explain(model, IMAGES, "gradcam", targets=[0, 1]).maps

    with ThreadPoolExecutor(THREADS) as pool:
        for maps in pool.map(call, range(24)):
            if maps is not None:
                torch.testing.assert_close(maps, alone, rtol=0, atol=1e-12)
    assert_same_state(before, state(model))


def test_looking_at_a_model_in_training_mode_changes_nothing():
    """trace_outputs (camlens layers) and the default-layer search ran the model as it was: in
    training mode, each look moved its batch norm statistics."""
    from camlens.capture import find_default_layer, trace_outputs

    model = mixed_model()
    model.features[1].train()  # its batch norm in training mode too
    before = state(model)
    trace_outputs(model, IMAGES)
    find_default_layer(model, IMAGES[:1])
    assert_same_state(before, state(model))
