"""The embedded EfficientNet-Lite0, its preprocessing, and loading the user's own models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens import CamlensError
from camlens.io import load_image
from camlens.models import Preprocess, efficientnet_lite0, load_model
from camlens.models.efficientnet import SameConv2d

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


@pytest.mark.parametrize("size, kernel, stride", [(224, 3, 2), (225, 3, 2), (112, 5, 2), (7, 5, 1), (30, 1, 1)])
def test_same_padding_matches_tensorflow(size, kernel, stride):
    """TensorFlow SAME: output ceil(n / s); the odd pixel of padding goes bottom/right."""
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel, stride=stride, bias=False)
    x = torch.randn(1, 2, size, size)
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    expected = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, stride=stride)
    result = conv(x)
    assert result.shape[-1] == math.ceil(size / stride)
    torch.testing.assert_close(result, expected)


def test_architecture_and_weights(lite0):
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert lite0._bn0.eps == 1e-3
    assert len(lite0._blocks) == 16 and not hasattr(lite0._blocks[0], "_expand_conv")
    assert lite0._blocks[15]._depthwise_conv.kernel_size == (3, 3)
    assert isinstance(lite0.features, nn.ReLU6)
    assert len(lite0.class_names) == 1000 and lite0.class_names[967] == "espresso"


def test_features_is_what_the_classifier_pools(lite0):
    """The default target layer is `features`, and the logits are fc(GAP(features))."""
    x = lite0.preprocess(load_image(SAMPLES / "coffee.png"))[None]
    seen = {}
    handle = lite0.features.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        logits = lite0(x)
    handle.remove()
    assert seen["a"].shape == (1, 1280, 7, 7)
    torch.testing.assert_close(logits, lite0._fc(seen["a"].mean(dim=(2, 3))))
    assert camlens.explain(lite0, x, "cam").target_layers == ("features",)


@pytest.mark.parametrize(
    "photo, expected, minimum",
    [
        ("chelsea.png", {"tabby", "tiger cat", "Egyptian cat"}, 0.85),
        ("coffee.png", {"espresso", "cup"}, 0.9),
        ("rocket.jpg", {"missile", "projectile"}, 0.4),
        ("cameraman.png", {"tripod"}, 0.9),
    ],
)
def test_predictions_on_the_sample_photos(lite0, photo, expected, minimum):
    x = lite0.preprocess(load_image(SAMPLES / photo))[None]
    with torch.no_grad():
        probabilities = lite0(x).softmax(1)[0]
    top = probabilities.argmax().item()
    assert lite0.class_names[top] in expected
    mass = sum(probabilities[i].item() for i, name in enumerate(lite0.class_names) if name in expected)
    assert mass >= minimum, f"{photo}: {mass:.2f} on {expected}"


def test_preprocess_resize_crop_normalise():
    from PIL import Image

    image = Image.new("RGB", (400, 200), (255, 0, 128))
    prep = Preprocess(size=8, resize=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert prep.crop_box(400, 200) == (150.0, 50.0, 250.0, 150.0)
    x = prep(image)
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -2.0, (128 / 255 - 0.5) / 0.5]))
    with pytest.raises(CamlensError, match="need 1 <= size <= resize"):
        Preprocess(size=300, resize=256)


# -- loading the user's own models --------------------------------------------------------------

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def make_small():
    torch.manual_seed(0)
    return Small().eval()


def test_torch_export_archive_is_unflattened_and_hookable(tmp_path):
    model = make_small()
    x = torch.randn(3, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    path = tmp_path / "small.pt2"
    torch.export.save(program, path)
    loaded = load_model(str(path))
    assert loaded.source.startswith("torch.export")
    for method in ("gradcam", "scorecam"):
        expected = camlens.explain(model, x, method, target_layer="features")
        got = camlens.explain(loaded.module, x, method, target_layer="features")
        torch.testing.assert_close(got.maps, expected.maps)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused_without_loading(tmp_path, monkeypatch):
    """Loading a TorchScript archive runs its code (__setstate__): it is known by its zip entries
    and refused before anything is loaded (issue 20, finding 7)."""
    path = tmp_path / "small.pt"
    torch.jit.script(make_small()).save(str(path))

    def never(*args, **kwargs):
        raise AssertionError("the archive was loaded")

    monkeypatch.setattr(torch.jit, "load", never)
    monkeypatch.setattr(torch.serialization, "load", never)
    with pytest.raises(CamlensError, match="a TorchScript archive, which camlens does not load"):
        load_model(str(path))
    with pytest.raises(CamlensError, match="TorchScript models cannot be explained"):
        camlens.GradCAM(torch.jit.script(make_small()), "features")  # a ScriptModule given in Python


def test_pickled_module_is_never_unpickled(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(make_small(), path)  # a pickle of the module object
    with pytest.raises(CamlensError, match="neither a TorchScript nor a torch.export archive"):
        load_model(str(path))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CamlensError, match="never unpickles"):
        load_model(str(text))


@pytest.fixture
def factory_package(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Small(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())\n"
        "        self.fc = nn.Linear(4, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.features(x).mean(dim=(2, 3)))\n\n"
        "def build():\n    return Small()\n\n"
        "def broken():\n    raise ValueError('no such backbone')\n\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_factory_with_weights(factory_package):
    weights = factory_package / "w.pt"
    reference = make_small()
    torch.save(reference.state_dict(), weights)
    loaded = load_model("userpkg.nets:build", weights=str(weights))
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), reference(x))
    assert loaded.preprocess == Preprocess() and loaded.class_names is None
    names = load_model("userpkg.nets:build", class_names=["a", "b", "c"]).class_names
    assert names == ["a", "b", "c"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("userpkg.nets:missing", "has no attribute 'missing'"),
        ("userpkg.nope:build", "cannot import 'userpkg.nope'"),
        ("userpkg.nets:broken", "the factory raised ValueError: no such backbone"),
        ("userpkg.nets:NOT_CALLABLE", "is not callable"),
        ("resnet51", "unknown model 'resnet51'"),
    ],
)
def test_model_spec_errors(factory_package, spec, message):
    with pytest.raises(CamlensError, match=message):
        load_model(spec)


def test_bad_weights(factory_package):
    pickled = factory_package / "module.pt"
    torch.save(make_small(), pickled)
    with pytest.raises(CamlensError, match="weights_only=True"):
        load_model("userpkg.nets:build", weights=str(pickled))
    wrong = factory_package / "wrong.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CamlensError, match="the weights do not fit the model"):
        load_model("userpkg.nets:build", weights=str(wrong))
    with pytest.raises(CamlensError, match="no such weights file"):
        load_model("userpkg.nets:build", weights=str(factory_package / "none.pt"))
