"""The default target layer is traced once per model, module tree and image shape, and remembered
without keeping the model alive: a later ``camlens.explain(model, x)`` runs exactly the forwards
of a call that names the layer."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch import nn

import camlens
from camlens.capture import find_default_layer

from conftest import count_rows

# These tests count the forwards of the model itself.
pytestmark = pytest.mark.usefixtures("no_inference_copy")


def make_net(seed: int = 0) -> nn.Sequential:
    """Default layer "3" (the last ReLU before the pooling) at any input size."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double().eval()


def make_pooled(seed: int = 0) -> nn.Sequential:
    """A 4x4 max pool in the middle: default layer "4" at 8x8 (a 2x2 map after it), "1" at 4x4."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(4, 6, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double().eval()


def images(n: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, size, size, dtype=torch.float64)


def forwards(model: nn.Module, call) -> tuple[list[int], object]:
    """The batch size of every forward of ``model`` during ``call()``, and what it returned."""
    rows, handle = count_rows(model)
    try:
        return rows, call()
    finally:
        handle.remove()


def explicit(model: nn.Module, x: torch.Tensor, method: str = "gradcam"):
    """The uncached path: the layer found by a fresh trace, given by name."""
    return camlens.explain(model, x, method, target_layer=find_default_layer(model, x[:1]))


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam"])
def test_second_call_runs_the_forwards_of_a_named_layer(method):
    net, x = make_net(), images()
    first_rows, first = forwards(net, lambda: camlens.explain(net, x, method))
    again_rows, again = forwards(net, lambda: camlens.explain(net, x, method))
    named_rows, named = forwards(net, lambda: camlens.explain(net, x, method, target_layer="3"))
    assert first_rows == [1] + named_rows  # the one trace, on one image
    assert again_rows == named_rows
    assert again.target_layers == first.target_layers == named.target_layers == ("3",)
    assert again.default_layer and first.default_layer and not named.default_layer
    assert torch.equal(again.maps, first.maps) and torch.equal(again.maps, named.maps)
    assert torch.equal(again.raw["3"], named.raw["3"])


def test_gradcam_after_the_first_call_is_one_forward():
    net, x = make_net(), images()
    camlens.explain(net, x)
    rows, _ = forwards(net, lambda: camlens.explain(net, x))
    assert rows == [2]


def test_another_batch_size_is_not_retraced():
    net = make_net()
    camlens.explain(net, images(n=1))
    rows, result = forwards(net, lambda: camlens.explain(net, images(n=3)))
    assert rows == [3]
    assert torch.equal(result.maps, explicit(net, images(n=3)).maps)


def test_another_image_size_is_retraced_and_can_change_the_layer():
    net = make_pooled()
    first_rows, large = forwards(net, lambda: camlens.explain(net, images(size=8)))
    small_rows, small = forwards(net, lambda: camlens.explain(net, images(size=4)))
    assert first_rows == [1, 2] and small_rows == [1, 2]
    assert large.target_layers == ("4",) and small.target_layers == ("1",)
    assert torch.equal(small.maps, explicit(net, images(size=4)).maps)
    # Both sizes stay remembered.
    assert forwards(net, lambda: camlens.explain(net, images(size=8)))[0] == [2]
    assert forwards(net, lambda: camlens.explain(net, images(size=4)))[0] == [2]


def test_a_replaced_module_of_the_same_type_is_seen():
    net, x = make_net(), images()
    assert camlens.explain(net, x).target_layers == ("3",)
    # The same type under the same name; its 8x8 kernel brings layer "3" down to 1x1.
    net[2] = nn.Conv2d(4, 6, 8).double()
    rows, result = forwards(net, lambda: camlens.explain(net, x))
    assert rows == [1, 2]
    assert result.target_layers == ("1",)
    assert torch.equal(result.maps, explicit(net, x).maps)


def test_an_added_convolution_at_the_end_becomes_the_default():
    net, x = make_net(), images()
    camlens.explain(net, x)
    net.insert(4, nn.Conv2d(6, 6, 1).double())
    rows, result = forwards(net, lambda: camlens.explain(net, x))
    assert rows == [1, 2]
    assert result.target_layers == ("4",)
    assert torch.equal(result.maps, camlens.explain(net, x, target_layer="4").maps)


def test_an_identity_swapped_in_is_retraced():
    net, x = make_net(), images()
    camlens.explain(net, x)
    net[3] = nn.Identity()
    rows, result = forwards(net, lambda: camlens.explain(net, x))
    assert rows == [1, 2] and result.target_layers == ("3",)
    assert torch.equal(result.maps, camlens.explain(net, x, target_layer="3").maps)


def test_another_dtype_is_retraced():
    net, x = make_net(), images()
    camlens.explain(net, x)
    net.float()
    rows, result = forwards(net, lambda: camlens.explain(net, x.float()))
    assert rows == [1, 2] and result.maps.dtype == torch.float32


def test_the_cache_does_not_keep_the_model_alive():
    net, x = make_net(), images()
    result = camlens.explain(net, x)
    method = camlens.get_method("gradcam")(net)
    method(x)
    alive = weakref.ref(net)
    layer = weakref.ref(net[3])
    del net, method
    gc.collect()
    assert alive() is None and layer() is None
    assert result.target_layers == ("3",)


def test_a_method_object_remembers_and_sees_a_changed_model():
    net, x = make_net(), images()
    method = camlens.get_method("gradcam")(net)
    assert forwards(net, lambda: method(x))[0] == [1, 2]
    assert forwards(net, lambda: method(x))[0] == [2]
    # Remembered across objects: a new method object on the same model does not trace again.
    assert forwards(net, lambda: camlens.get_method("gradcam")(net)(x))[0] == [2]
    net[2] = nn.Conv2d(4, 6, 8).double()
    rows, result = forwards(net, lambda: method(x))
    assert rows == [1, 2] and result.target_layers == ("1",)


def test_models_are_remembered_apart():
    one, two, x = make_net(0), make_pooled(0), images()
    assert camlens.explain(one, x).target_layers == ("3",)
    assert camlens.explain(two, x).target_layers == ("4",)
    assert forwards(one, lambda: camlens.explain(one, x))[0] == [2]
    assert forwards(two, lambda: camlens.explain(two, x))[0] == [2]


def test_threads_each_get_their_models_default():
    models = [make_net(seed) if seed % 2 else make_pooled(seed) for seed in range(6)]
    x = images()
    expected = [explicit(model, x).maps for model in models]
    results: dict[int, torch.Tensor] = {}

    def run(index: int) -> None:
        for _ in range(3):
            results[index] = camlens.explain(models[index], x).maps

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[index], expected[index]) for index in range(len(models)))
