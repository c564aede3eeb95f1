"""Ablation-CAM and Recipro-CAM reuse the cut of the model at the target layer from one call to
the next (camlens.accelerate.remembered_cut) only while it is still the model's: a replaced
module or a changed number read in forward gives the maps of a method made afresh."""

from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch
from torch import nn

import camlens
import camlens.methods.gradient_free as gradient_free
from camlens import accelerate


class Scaled(nn.Module):
    """Conv features, then a head that multiplies by a number kept on the module: torch.fx
    records the number as a constant of the traced graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)
        self.scale = 1.0
        self.shift = 0.0

    def forward(self, x):
        a = self.features(x)
        return self.fc(a.mean(dim=(2, 3)) * self.scale + self.shift * a.amax(dim=(2, 3)))


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 10, 10, dtype=torch.float64)


@pytest.fixture
def cuts(monkeypatch):
    """How many times the model is traced and cut."""
    made = []
    real = gradient_free.cut

    def counted(module, layer):
        made.append(layer)
        return real(module, layer)

    monkeypatch.setattr(gradient_free, "cut", counted)
    return made


def fresh(name, model, images):
    """The method's maps with nothing remembered: a new method object cuts afresh."""
    return camlens.methods.METHODS[name](model, "features")(images, 1)


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_the_cut_is_made_once_and_reused(name, images, cuts):
    model = Scaled().double().eval()
    method = camlens.methods.METHODS[name](model, "features")
    first = method(images, 1)
    second = method(images, 1)
    assert cuts == ["features"]
    other = camlens.methods.METHODS[name](model, "features")(images, 1)  # another object: its own cut
    assert cuts == ["features", "features"]
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)
    torch.testing.assert_close(other.maps, first.maps, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_a_replaced_module_is_cut_again(name, images, cuts):
    model = Scaled().double().eval()
    method = camlens.methods.METHODS[name](model, "features")
    before = method(images, 1)
    torch.manual_seed(5)
    model.fc = nn.Linear(6, 4).double()
    after = method(images, 1)
    assert cuts == ["features", "features"]
    assert (after.maps - before.maps).abs().max() > 1e-3
    torch.testing.assert_close(after.maps, fresh(name, model, images).maps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_a_changed_number_in_forward_is_caught_by_the_check(name, images, cuts):
    """The structure is the same, so the remembered cut is offered, but its recorded constant
    no longer gives the model's outputs: the check refuses it and the model is cut afresh."""
    model = Scaled().double().eval()
    method = camlens.methods.METHODS[name](model, "features")
    method(images, 1)
    model.shift = 0.7  # changes the scores through a.amax, which the recorded graph multiplies by 0
    after = method(images, 1)
    assert cuts == ["features", "features"]
    expected = fresh(name, model, images)
    torch.testing.assert_close(after.maps, expected.maps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after.scores, expected.scores, rtol=1e-12, atol=1e-12)


def test_a_remembered_cut_does_not_keep_the_model_alive(images):
    model = Scaled().double().eval()
    method = camlens.methods.METHODS["ablationcam"](model, "features")
    method(images, 1)
    memory = method.cuts
    assert accelerate.remembered_cut(model, "features", memory) is not None
    gone = weakref.ref(model)
    del model, method  # the memory outlives them
    gc.collect()
    assert gone() is None and len(memory.cuts) == 0


def test_structure_changes_that_forget_the_cut():
    model = Scaled().double().eval()
    memory = accelerate.CutMemory()
    parts = accelerate.cut(model, "features")
    accelerate.remember_cut(model, "features", parts, memory)
    assert accelerate.remembered_cut(model, "features", memory) is parts
    with torch.no_grad():
        model.fc.weight.mul_(2)  # in place: the graph holds the same tensor
    assert accelerate.remembered_cut(model, "features", memory) is parts
    model.fc.weight = nn.Parameter(model.fc.weight.detach().clone())
    assert accelerate.remembered_cut(model, "features", memory) is None
    accelerate.remember_cut(model, "features", accelerate.cut(model, "features"), memory)
    model.train()
    assert accelerate.remembered_cut(model, "features", memory) is None
    model.eval()
    assert accelerate.remembered_cut(model, "features", memory) is not None
    model.features.forward = lambda x: x
    assert accelerate.remembered_cut(model, "features", memory) is None
    accelerate.remember_cut(model, "features", None, memory)
    del model.features.forward
    assert accelerate.remembered_cut(model, "features", memory) is None


class Floored(nn.Module):
    """Scores floored at a number the head reads in several ways; the floor starts far below
    every score, and each change below sets it just below the clean images' lowest logit: the
    model's outputs on them are unchanged (the check on them cannot see it), those of Recipro-CAM's
    masked maps fall below the floor."""

    def __init__(self, read: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)
        self.read = read
        self.floor = -1e9
        self.config = {"floor": -1e9}
        self.options = types.SimpleNamespace(floor=-1e9)
        self.register_buffer("floor_buffer", torch.tensor(-1e9))
        self.floor_tensor = torch.tensor(-1e9)

    def logits(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def forward(self, x):
        logits = self.logits(x)
        if self.read == "attribute":
            return logits.clamp(min=self.floor)
        if self.read == "dict":
            return logits.clamp(min=self.config["floor"])
        if self.read == "object":
            return logits.clamp(min=self.options.floor)
        if self.read == "buffer":
            return logits.clamp(min=float(self.floor_buffer))
        return torch.maximum(logits, self.floor_tensor)  # "tensor": the graph keeps the tensor


FLOORS = {
    "attribute": lambda model, floor: setattr(model, "floor", floor),
    "dict": lambda model, floor: model.config.update(floor=floor),
    "object": lambda model, floor: setattr(model.options, "floor", floor),
    "buffer": lambda model, floor: model.floor_buffer.fill_(floor),
    "tensor": lambda model, floor: setattr(model, "floor_tensor", torch.tensor(floor, dtype=torch.float64)),
    "class forward": lambda model, floor: (
        setattr(model, "floor", floor),
        setattr(type(model), "forward", lambda self, x: self.logits(x).clamp(min=self.floor)),
    ),
}


@pytest.mark.parametrize("change", list(FLOORS))
def test_a_changed_attribute_the_check_cannot_see_is_cut_again(change, images):
    """An attribute read in forward after the layer changes only the scores of changed maps: the
    remembered cut, whose graph recorded the old value, passes the check on the clean images, so
    the attribute itself must forget it."""
    cls = type("Floored2", (Floored,), {})  # its own class: "class forward" replaces its forward
    model = cls("tensor" if change == "class forward" else change).double().eval()
    method = camlens.methods.METHODS["reciprocam"](model, "features")
    before = method(images, 1)
    with torch.no_grad():
        FLOORS[change](model, float(model(images).min()) - 1e-6)
        assert torch.equal(model(images), model.logits(images))  # the clean outputs are the same
    after = method(images, 1)
    expected = fresh("reciprocam", model, images)
    assert (expected.maps - before.maps).abs().max() > 0.1  # the change shows in the maps
    torch.testing.assert_close(after.maps, expected.maps, rtol=1e-12, atol=1e-12)


FLOOR = {"value": -1e9}


class Global(nn.Module):
    """Scores floored at a module-level number: tracing records it, and nothing on the model
    shows a change of it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3))).clamp(min=FLOOR["value"])


def test_a_new_method_object_cuts_afresh_and_a_copy_remembers_nothing(images, monkeypatch):
    """The remembered cut is the method object's own: after a change that neither the model's
    attributes nor its outputs on the clean images show (a global read in forward), a new
    object gives the new model's maps (a cache shared by all objects gave the old ones). Copies
    of the memory start empty."""
    import copy
    import pickle

    model = Global().double().eval()
    method = camlens.methods.METHODS["reciprocam"](model, "features")
    before = method(images, 1)
    with torch.no_grad():
        clean = model(images)
    monkeypatch.setitem(FLOOR, "value", float(clean.min()) - 1e-6)
    with torch.no_grad():
        assert torch.equal(model(images), clean)
    after = camlens.methods.METHODS["reciprocam"](model, "features")(images, 1)
    monkeypatch.setattr(gradient_free, "cut", lambda module, layer: None)  # the hook path: no tracing at all
    expected = camlens.methods.METHODS["reciprocam"](model, "features")(images, 1)
    assert (expected.maps - before.maps).abs().max() > 0.1  # the change shows in the maps
    torch.testing.assert_close(after.maps, expected.maps, rtol=1e-12, atol=1e-12)
    assert len(copy.deepcopy(method.cuts).cuts) == 0 and len(method.cuts.cuts) == 1
    assert len(pickle.loads(pickle.dumps(method.cuts)).cuts) == 0


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_no_generated_source_kept_after_the_cut_is_gone(name, images):
    """torch.fx keeps each traced graph's source in its own cache and in linecache; camlens drops
    it with the cut. Before, camlens.explain (a new method object, so a new cut, per call) grew
    both by one entry a call: 1 to 2 KB, +13 MB over 2,000 calls."""
    import linecache

    from torch.fx.graph_module import _loader

    model = Scaled().double()
    camlens.explain(model, images, name, target_layer="features")
    gc.collect()
    sources, lines = len(_loader.eval_cache), len(linecache.cache)
    for _ in range(20):
        camlens.explain(model, images, name, target_layer="features")
    gc.collect()
    assert len(_loader.eval_cache) == sources
    assert len(linecache.cache) == lines
