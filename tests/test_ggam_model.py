"""GGAM on the embedded backbone: the model, its run folder, and the commands that load it."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

import camlens
from camlens import __version__
from camlens.capture import find_default_layer
from camlens.errors import CamlensError
from camlens.ggam import GGAMNet, ggam_efficientnet_lite0, label_gradcam_weights, load_run, save_run
from camlens.models import Preprocess, load_model
from helpers import SAMPLES, run

NAMES = ["sparrow", "finch", "wren"]
KWARGS = {"num_classes": 3, "reduction": 8, "spatial_attention": False}


def make_model():
    torch.manual_seed(0)
    return ggam_efficientnet_lite0(3, pretrained=False, reduction=8, spatial_attention=False, class_names=NAMES).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("run")
    save_run(folder, model, "ggam_efficientnet_lite0", KWARGS, NAMES, model.preprocess, extra={"epochs": 2})
    return folder


def test_forward_is_the_logits_of_attend(model, x):
    logits = model(x)
    out = model.attend(x)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, out.logits)
    assert out.features.shape == (2, 1280, 2, 2)
    assert (model.reduction, model.channel_attention, model.spatial_attention) == (8, True, False)
    assert model.head.attention[0].out_features == 1280 // 8 and model.class_names == NAMES
    assert model.preprocess == load_model().preprocess  # the backbone's preprocessing


def test_default_layer_is_the_map_ggam_attends_to(model, x):
    assert find_default_layer(model, x) == "backbone"
    seen = {}
    handle = model.backbone.features.register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
    with torch.no_grad():
        out = model.attend(x)
    handle.remove()
    torch.testing.assert_close(seen["map"], out.features)


def test_gradcam_weights_are_the_ggam_targets(model, x):
    labels = torch.tensor([2, 0])
    explanation = camlens.explain(model, x, method="gradcam", targets=labels)
    assert explanation.target_layers == ("backbone",) and explanation.default_layer
    beta = label_gradcam_weights(model.attend(x), labels)
    torch.testing.assert_close(explanation.weights["backbone"][:, 0], beta)
    # Independently: the mean gradient of the label's logit over the feature map's positions.
    features = model.backbone(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.head(features).logits.gather(1, labels[:, None]).sum(), features)
    torch.testing.assert_close(beta, grad.mean((2, 3)))


def test_pretrained_backbone_is_the_embedded_model():
    lite = load_model().module
    net = ggam_efficientnet_lite0(2)
    assert not any(name.startswith(("_fc", "pool", "dropout")) for name, _ in net.backbone.named_modules() if name)
    torch.testing.assert_close(net.backbone._conv_head.weight, lite._conv_head.weight)
    torch.testing.assert_close(net.backbone._blocks[3]._bn1.running_var, lite._blocks[3]._bn1.running_var)


def test_user_backbone_and_bad_options():
    net = GGAMNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 4, 2, reduction=2, channel_attention=False)
    x = torch.randn(1, 3, 8, 8)
    assert net(x).shape == (1, 2) and find_default_layer(net, x) == "backbone"
    with pytest.raises(CamlensError, match="not a feature map"):  # a backbone returning a tuple
        GGAMNet(nn.LSTM(8, 4), 4, 2)(torch.randn(1, 3, 8))
    with pytest.raises(CamlensError, match=r"feature maps \(N, 5, H, W\)"):  # the wrong channel count
        GGAMNet(nn.Conv2d(3, 4, 3), 5, 2)(x)
    with pytest.raises(CamlensError, match="2 class names"):
        ggam_efficientnet_lite0(2, pretrained=False, class_names=["a"])


def test_run_round_trip(run_dir, model, x):
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["camlens version"] == __version__
    assert record["builder kwargs"] == KWARGS and record["extra"] == {"epochs": 2}
    loaded = load_run(run_dir)
    assert loaded.class_names == NAMES and loaded.preprocess == model.preprocess
    assert not loaded.module.training and loaded.module.spatial_attention is False
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)
    through_cli = load_model(str(run_dir))  # what --model RUN_DIR does
    assert through_cli.class_names == NAMES and through_cli.preprocess == model.preprocess
    assert through_cli.class_name(1) == "finch"
    # Overridden preprocessing is saved and restored as given.
    other = Preprocess(size=64, resize=None)
    save_run(run_dir.parent / "other", model, "ggam_efficientnet_lite0", KWARGS, NAMES, other)
    assert load_run(run_dir.parent / "other").preprocess == other


def _copy(run_dir, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("run.json", "best.pt"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    return folder


def _edit(folder, **changes):
    record = json.loads((folder / "run.json").read_text())
    record.update(changes)
    (folder / "run.json").write_text(json.dumps(record))


def _error(folder):
    with pytest.raises(CamlensError) as caught:
        load_run(folder)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_run_folders(run_dir, tmp_path, model):
    assert "no run.json" in _error(tmp_path)
    folder = _copy(run_dir, tmp_path)
    text = (folder / "run.json").read_text()
    (folder / "run.json").write_text(text[: len(text) // 2])
    assert "damaged" in _error(folder)
    (folder / "run.json").write_text(text)
    _edit(folder, builder="resnet_ggam")
    assert "unknown model builder 'resnet_ggam'" in _error(folder)
    (folder / "run.json").write_text(text)
    _edit(folder, **{"camlens version": "7.1.0"})
    message = _error(folder)
    assert "camlens 7.1.0" in message and f"this is camlens {__version__}" in message
    (folder / "run.json").write_text(text)
    _edit(folder, status="running")
    message = _error(folder)
    assert "did not finish" in message and "'running'" in message and "weights in best.pt" in message
    assert '"epochs": 2' in message
    (folder / "run.json").write_text(text)
    _edit(folder, **{"builder kwargs": {**KWARGS, "num_classes": 4}})
    assert "damaged: num_classes 4 for 3 class names" in _error(folder)
    # Crafted: a head of 2e9 classes was allocated (a traceback); now refused before the model is built.
    _edit(folder, **{"builder kwargs": {**KWARGS, "num_classes": 2_000_000_000}})
    assert "damaged: num_classes 2000000000 for 3 class names" in _error(folder)
    (folder / "run.json").write_text(text)
    _edit(folder, preprocessing={**json.loads(text)["preprocessing"], "interpolation": "sinc"})
    assert "unknown interpolation 'sinc'" in _error(folder)
    _edit(folder, **{"builder kwargs": {**KWARGS, "layers": 3}})
    assert "damaged" in _error(folder)
    (folder / "run.json").write_text(text)
    _edit(folder, preprocessing={"size": "big"})
    assert "damaged" in _error(folder)
    (folder / "run.json").write_text(text)
    state = torch.load(folder / "best.pt", weights_only=True)
    state["head.extra"] = torch.zeros(1)
    torch.save(state, folder / "best.pt")
    assert "damaged or replaced (its digest is not the one run.json records)" in _error(folder)
    _edit(folder, **{"weights sha256": None})  # a record without a digest: the weights' keys are checked
    assert "do not fit" in _error(folder)  # strict: an unexpected key
    torch.save({"model": nn.Linear(1, 1)}, folder / "best.pt")
    assert "weights_only=True" in _error(folder)  # a pickled module is never unpickled
    (folder / "best.pt").unlink()
    assert "best.pt named in run.json is missing" in _error(folder)
    with pytest.raises(CamlensError, match="JSON values"):
        save_run(tmp_path / "nan", model, "ggam_efficientnet_lite0", {"num_classes": float("nan")}, NAMES, model.preprocess)
    with pytest.raises(CamlensError, match="unknown model builder"):
        save_run(tmp_path / "x", model, "mine", KWARGS, NAMES, model.preprocess)
    assert not (tmp_path / "nan").exists() and not (tmp_path / "x").exists()


def test_cli_explains_and_lists_a_run(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run(["explain", "--model", run_dir, SAMPLES / "chelsea.png", "-m", "gradcam",
                                     "--out", out, "--device", "cpu"], capsys)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["classes"] == 3
    text = json.dumps(manifest)
    assert any(name in text for name in NAMES) and "tabby" not in text
    assert manifest["target_layers"] == ["backbone"]
    code, stdout, stderr = run(["layers", "--model", run_dir], capsys)
    assert code == 0, stderr
    assert "backbone" in stdout and "head.classifier" in stdout
    code, _, stderr = run(["layers", "--model", tmp_path], capsys)
    assert code != 0 and stderr.startswith("camlens: error:") and "no run.json" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert Image.open(next(out.rglob("*.png"))).size[0] > 0
