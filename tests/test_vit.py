"""Vision transformers: a token layer (N, L, D) read as a feature map (N, D, h, w) through
``reshape`` (camlens.capture.TokenGrid), on a tiny transformer built here."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens import CamlensError
from camlens.capture import TokenGrid
from helpers import run

# The first block's output, the input of the last block's attention: after that attention the
# blocks (post-norm) work token by token, and the patch tokens no longer reach the class token.
LAYER = "blocks.0"


class TinyViT(nn.Module):
    """Patch embedding (4x4 patches), a class token and ``registers`` register tokens, two encoder
    blocks, a linear head on the class token."""

    def __init__(self, dim: int = 16, classes: int = 5, registers: int = 1, batch_first: bool = True) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.registers = nn.Parameter(torch.randn(1, registers, dim))
        self.batch_first = batch_first
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=batch_first) for _ in range(2)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        n = tokens.shape[0]
        tokens = torch.cat([self.cls.expand(n, -1, -1), self.registers.expand(n, -1, -1), tokens], dim=1)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        tokens = self.blocks(tokens)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        return self.head(self.norm(tokens[:, 0]))


def make_vit(**kwargs) -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(**kwargs).double().eval()


@pytest.fixture
def vit() -> TinyViT:
    return make_vit()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16, dtype=torch.float64)


def hand_gradcam(model: nn.Module, images: torch.Tensor, layer: str, prefix: int, h: int, w: int):
    """Grad-CAM one image at a time, the token gradient reshaped by hand (row-major patches)."""
    module = model.get_submodule(layer)
    raws, classes = [], []
    for image in images:
        kept = {}
        handle = module.register_forward_hook(lambda m, i, out: kept.setdefault("tokens", out))
        try:
            logits = model(image[None])
        finally:
            handle.remove()
        target = int(logits.argmax())
        tokens = kept["tokens"][0]  # (L, D)
        (grad,) = torch.autograd.grad(logits[0, target], kept["tokens"])
        activation = tokens[prefix:].reshape(h, w, -1).permute(2, 0, 1)  # (D, h, w)
        gradient = grad[0, prefix:].reshape(h, w, -1).permute(2, 0, 1)
        weights = gradient.mean(dim=(1, 2))
        raws.append(torch.relu((weights[:, None, None] * activation).sum(0)).detach())
        classes.append(target)
    return torch.stack(raws), classes


def test_gradcam_on_tokens_equals_a_plain_loop_that_reshapes_by_hand(vit, images):
    explanation = camlens.GradCAM(vit, LAYER, reshape="tokens")(images)
    raw, classes = hand_gradcam(vit, images, LAYER, prefix=2, h=4, w=4)
    assert explanation.raw[LAYER].shape == (3, 1, 4, 4)
    assert explanation.targets[:, 0].tolist() == classes
    torch.testing.assert_close(explanation.raw[LAYER][:, 0], raw, rtol=1e-9, atol=1e-12)
    assert bool((raw.amax(dim=(1, 2)) > 0).all())
    assert explanation.maps.shape == (3, 1, 16, 16)
    # The map is the activation-weighted sum: the weights are the token gradient's mean.
    assert explanation.weights[LAYER].shape == (3, 1, 16)
    assert explanation.options["reshape"] == "tokens"


def test_grid_inferred_equals_grid_given(vit, images):
    inferred = camlens.GradCAM(vit, LAYER, reshape="tokens")(images)
    for given in ("tokens:2", "tokens:4x4", "tokens:2:4x4", TokenGrid(prefix=2, size=(4, 4), batch_first=True)):
        explanation = camlens.GradCAM(vit, LAYER, reshape=given)(images)
        torch.testing.assert_close(explanation.maps, inferred.maps, rtol=0, atol=0)


def test_more_register_tokens_are_inferred(images):
    model = make_vit(registers=4)  # 1 + 4 + 16 tokens
    explanation = camlens.GradCAM(model, LAYER, reshape="tokens")(images)
    raw, _ = hand_gradcam(model, images, LAYER, prefix=5, h=4, w=4)
    torch.testing.assert_close(explanation.raw[LAYER][:, 0], raw, rtol=1e-9, atol=1e-12)


def test_non_square_input_gives_a_non_square_grid(vit):
    torch.manual_seed(2)
    wide = torch.randn(2, 3, 16, 20, dtype=torch.float64)  # a 4x5 grid of patches, 2 + 20 tokens
    explanation = camlens.GradCAM(vit, LAYER, reshape="tokens")(wide)
    raw, _ = hand_gradcam(vit, wide, LAYER, prefix=2, h=4, w=5)
    assert explanation.raw[LAYER].shape == (2, 1, 4, 5)
    torch.testing.assert_close(explanation.raw[LAYER][:, 0], raw, rtol=1e-9, atol=1e-12)


def test_tokens_that_make_no_grid_give_one_clear_error(vit, images):
    with pytest.raises(CamlensError, match=r"layer 'blocks.0' outputs tokens of shape \(3, 18, 16\): its 18 "
                                           r"tokens less 1 prefix token\(s\) leave 17, which make no grid \(square\)"):
        camlens.GradCAM(vit, LAYER, reshape="tokens:1")(images)
    with pytest.raises(CamlensError, match=r"its 18 tokens are not -2 prefix token\(s\) and a 4x5 grid"):
        camlens.GradCAM(vit, LAYER, reshape=TokenGrid(size=(4, 5)))(images)
    torch.manual_seed(3)
    odd = torch.randn(1, 3, 16, 18, dtype=torch.float64)  # 4x4 patches of a 16x18 image: no grid of its shape
    with pytest.raises(CamlensError, match=r"its 18 tokens make no grid of the input's aspect ratio 16:18: give the "
                                           r"grid's size"):
        camlens.GradCAM(vit, LAYER, reshape="tokens")(odd)
    camlens.GradCAM(vit, LAYER, reshape="tokens:2:4x4")(odd)  # given, it is read


def test_tokens_sequence_first(vit, images):
    """Tokens (L, N, D), as nn.TransformerEncoderLayer without batch_first returns them."""
    sequence_first = make_vit(batch_first=False)
    sequence_first.load_state_dict(vit.state_dict())
    expected = camlens.GradCAM(vit, LAYER, reshape="tokens")(images)
    for reshape in ("tokens", "tokens:lnd", TokenGrid(batch_first=False)):
        got = camlens.GradCAM(sequence_first, LAYER, reshape=reshape)(images)
        torch.testing.assert_close(got.raw[LAYER], expected.raw[LAYER], rtol=1e-9, atol=1e-12)
    with pytest.raises(CamlensError, match=r"tokens of shape \(18, 3, 16\), which is not \(N, L, D\) for a batch of 3"):
        camlens.GradCAM(sequence_first, LAYER, reshape=TokenGrid(batch_first=True))(images)


def test_scorecam_on_tokens_equals_its_masked_inputs_scored_by_hand(vit, images):
    explanation = camlens.ScoreCAM(vit, LAYER, reshape="tokens")(images[:1])
    module = vit.get_submodule(LAYER)
    kept = {}
    handle = module.register_forward_hook(lambda m, i, out: kept.setdefault("tokens", out))
    with torch.no_grad():
        logits = vit(images[:1])
    handle.remove()
    target = int(logits.argmax())
    grid = kept["tokens"][0, 2:].reshape(4, 4, -1).permute(2, 0, 1)  # (D, 4, 4)
    weights = []
    for channel in grid:
        up = F.interpolate(channel[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        span = up.max() - up.min()
        mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
        with torch.no_grad():
            weights.append(vit(images[:1] * mask).softmax(1)[0, target])
    torch.testing.assert_close(explanation.weights[LAYER][0, 0], torch.stack(weights), rtol=1e-7, atol=1e-9)


def _accepts(cls, name):
    return name in inspect.signature(cls).parameters


def _method_names():
    for name in camlens.METHODS:
        if name != "cam":
            yield name


@pytest.mark.parametrize("name", list(_method_names()))
def test_every_method_runs_on_tokens_one_by_one_as_in_a_batch(name, vit, images):
    cls = camlens.METHODS[name]
    seeded = _accepts(cls, "seed")
    method = cls(vit, LAYER, reshape="tokens", **({"seed": 0} if seeded else {}))
    batch = method(images)
    assert batch.maps.shape == (3, 1, 16, 16)
    assert bool(torch.isfinite(batch.maps).all()) and bool((batch.maps.amax(dim=(1, 2, 3)) > 0).all())
    # A seeded method draws the noise of all images at once: the first image's is the same alone.
    alone = images[:1] if seeded else images
    one = torch.cat([method(image[None]).maps for image in alone])
    torch.testing.assert_close(batch.maps[: len(alone)], one, rtol=1e-6, atol=1e-8)


def test_inference_copy_reads_tokens_the_same(vit, images):
    plain = camlens.GradCAM(vit, LAYER, reshape="tokens")(images)
    fast = camlens.GradCAM(vit, LAYER, reshape="tokens", optimize=True)(images)
    torch.testing.assert_close(fast.maps, plain.maps, rtol=1e-6, atol=1e-8)


def test_errors_point_to_the_option(vit, images):
    with pytest.raises(CamlensError, match=r"layer 'blocks.0' outputs a tensor of shape \(3, 18, 16\), not a "
                                           r"feature map .* give reshape='tokens' \(--reshape tokens\)"):
        camlens.GradCAM(vit, LAYER)(images)
    with pytest.raises(CamlensError, match="reshape needs a named target layer"):
        camlens.GradCAM(vit, reshape="tokens")
    with pytest.raises(CamlensError, match=r"unknown reshape 'grid': give 'tokens'"):
        camlens.GradCAM(vit, LAYER, reshape="grid")
    with pytest.raises(CamlensError, match="a token grid's size is a pair of positive integers"):
        TokenGrid(size=(0, 4))
    with pytest.raises(CamlensError, match=r"layer 'head' outputs a tensor of shape \(3, 5\), not a feature map"):
        camlens.GradCAM(vit, "head", reshape="tokens")(images)


# -- the command line ----------------------------------------------------------------------------

FACTORY = '''
import torch
from test_vit import TinyViT

def factory():
    torch.manual_seed(0)
    return TinyViT()
'''


@pytest.fixture
def vit_module(tmp_path, monkeypatch):
    (tmp_path / "tinyvit.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    return ["--model", "tinyvit:factory", "--input-size", "16"]


def test_layers_marks_the_token_layers(vit_module, capsys):
    code, out, err = run(["layers", *vit_module], capsys)
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "tokens: --reshape tokens reads 2 + 4x4" in rows["blocks.1"]
    # The patch embedding, the last 4-D map, is not a map of what the model concluded (issue 21):
    # the default is the input of the last block's attention, read as 2 prefix tokens and a 4x4 grid.
    assert "default target layer, read as tokens:2:4x4" in rows["blocks.0"]
    assert [name for name, row in rows.items() if "default target layer" in row] == ["blocks.0"]
    assert err.startswith("default target layer: blocks.0, read as tokens:2:4x4: the last token sequence whose patch "
                          "tokens the score depends on: the input of the last attention")
    assert "tokens" not in rows["head"] and "tokens" not in rows["patch"]


def test_explain_with_reshape(vit_module, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (20, 20), (200, 30, 90)).save(photo)
    out = tmp_path / "out"
    code, _, err = run(["explain", photo, *vit_module, "--target-layer", LAYER, "-m", "gradcam", "--out", out], capsys)
    assert code == 1 and err.startswith("camlens: error: layer 'blocks.0' outputs a tensor of shape (2, 18, 16)")
    assert "--reshape tokens" in err and "Traceback" not in err
    code, _, err = run(["explain", photo, *vit_module, "--reshape", "tokens", "-m", "gradcam", "--out", out], capsys)
    assert code == 1 and "camlens: error: --reshape needs --target-layer" in err
    code, _, err = run(["explain", photo, *vit_module, "--reshape", "tokns", "--target-layer", LAYER, "--out", out],
                       capsys)
    assert code == 2 and "unknown reshape 'tokns'" in err
    code, _, err = run(["explain", photo, *vit_module, "--target-layer", LAYER, "--reshape", "tokens", "-m", "gradcam",
                        "-m", "scorecam", "--out", out, "--no-optimize"], capsys)
    assert code == 0, err
    import json
    import numpy as np

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["reshape"] == "tokens"
    saved = np.load(out / "photo" / "maps.npz")
    assert saved[f"gradcam/raw/{LAYER}"].shape == (1, 4, 4)
    assert saved["scorecam/maps"].shape == (1, 16, 16)


# -- reshape as a function (pytorch-grad-cam's reshape_transform) and channels-last maps (issue 21) ---

def drop_prefix(tokens: torch.Tensor) -> torch.Tensor:
    """pgc's usual reshape_transform: the class and register tokens left out, the rest a 4x4 grid."""
    patches = tokens[:, 2:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], 4, 4)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "ablationcam", "layercam", "eigencam",
                                    "hirescam", "reciprocam"])
def test_a_reshape_function_gives_the_token_grids_maps(vit, method):
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grid = camlens.explain(vit, images, method, target_layer=LAYER, reshape="tokens:2", targets=[1, 3])
    function = camlens.explain(vit, images, method, target_layer=LAYER, reshape=drop_prefix, targets=[1, 3])
    torch.testing.assert_close(function.maps, grid.maps, rtol=0, atol=1e-10)
    torch.testing.assert_close(function.raw[LAYER], grid.raw[LAYER], rtol=0, atol=1e-10)
    assert function.options["reshape"] == "drop_prefix"


def test_a_reshape_function_that_makes_no_map_is_refused(vit):
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(CamlensError, match=r"reshape .* made a tensor of shape \(2, 18\) .*not a map \(N, channels, height, width\)"):
        camlens.explain(vit, images, "gradcam", target_layer=LAYER, reshape=lambda t: t.mean(dim=2))


class ChannelsLastNet(nn.Module):
    """A convolution whose map goes on channels-last, (N, H, W, C), through ``stage``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.stage = nn.Identity()
        self.act = nn.Identity()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = self.stage(torch.relu(self.conv(x)).permute(0, 2, 3, 1))
        return self.fc((a * a).mean(dim=(1, 2)))


class SameNetChannelsFirst(nn.Module):
    def __init__(self, other: ChannelsLastNet) -> None:
        super().__init__()
        self.other = other
        self.act = nn.Identity()

    def forward(self, x):
        a = self.act(torch.relu(self.other.conv(x)))
        return self.other.fc((a * a).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "ablationcam", "layercam", "hirescam",
                                    "eigencam"])
def test_nhwc_reads_a_channels_last_map(method):
    model = ChannelsLastNet().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = camlens.explain(model, images, method, target_layer="stage", reshape="nhwc", targets=[1, 2])
    expected = camlens.explain(SameNetChannelsFirst(model).eval(), images, method, target_layer="act", targets=[1, 2])
    torch.testing.assert_close(got.maps, expected.maps, rtol=0, atol=1e-10)


def test_the_command_line_takes_nhwc_and_a_function(tmp_path, monkeypatch, capsys):
    (tmp_path / "layouts.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); torch.manual_seed(0)\n"
        "        self.conv = nn.Conv2d(3, 6, 3, padding=1); self.stage = nn.Identity(); self.fc = nn.Linear(6, 4)\n"
        "    def forward(self, x):\n"
        "        a = self.stage(torch.relu(self.conv(x)).permute(0, 2, 3, 1))\n"
        "        return self.fc((a * a).mean(dim=(1, 2)))\n"
        "def net():\n    return Net()\n"
        "def first(output):\n    return output.permute(0, 3, 1, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from helpers import SAMPLES

    maps = {}
    for reshape in ("nhwc", "layouts:first"):
        out = tmp_path / reshape.replace(":", "-")
        code, _, err = run(["explain", SAMPLES / "coffee.png", "--model", "layouts:net", "--input-size", "16",
                            "--target-layer", "stage", "--reshape", reshape, "-m", "gradcam", "--out", out], capsys)
        assert code == 0, err
        with __import__("numpy").load(out / "coffee" / "maps.npz") as saved:
            maps[reshape] = saved["gradcam/maps"]
    assert abs(maps["nhwc"] - maps["layouts:first"]).max() < 1e-6


# -- the default layer, found with its layout (issue 21) ------------------------------------------

@pytest.mark.parametrize("name", list(_method_names()))
def test_every_method_finds_the_token_layer_and_its_layout_by_itself(name, vit, images):
    """No layer given: the input of the last block's attention, read as 2 prefix tokens and a 4x4
    grid, gives the maps that naming it with reshape='tokens' gives."""
    cls = camlens.METHODS[name]
    seed = {"seed": 0} if _accepts(cls, "seed") else {}
    found = cls(vit, **seed)(images)
    named = cls(vit, LAYER, reshape="tokens", **seed)(images)
    assert found.target_layers == (LAYER,) and found.default_layer
    assert found.options["reshape"] == "tokens:2:4x4"
    assert found.maps.shape == (3, 1, 16, 16)
    torch.testing.assert_close(found.maps, named.maps, rtol=0, atol=1e-12)


def test_a_class_token_head_after_two_blocks_gets_the_first_blocks_output_not_the_last():
    """The patch tokens reach the class token through the last attention only: after it (blocks.1's
    output, the final norm) a map would be blank, so those are passed over."""
    from camlens.capture import default_layer

    found = default_layer(make_vit(), torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert (found.name, found.layout) == (LAYER, TokenGrid(prefix=2, size=(4, 4)))
    assert "the input of the last attention" in found.why


def test_the_default_reads_a_channels_last_stage_as_nhwc():
    model = ChannelsLastNet().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    found = camlens.explain(model, images, "gradcam", targets=[1, 2])
    named = camlens.explain(model, images, "gradcam", target_layer="stage", reshape="nhwc", targets=[1, 2])
    assert found.target_layers == ("stage",) and found.options["reshape"] == "nhwc"
    torch.testing.assert_close(found.maps, named.maps, rtol=0, atol=0)


@pytest.mark.parametrize("shape, image, reading", [
    ((1, 768, 7, 7), (224, 224), "nchw"),
    ((1, 7, 7, 768), (224, 224), "nhwc"),  # torchvision's Swin stages
    ((1, 8, 8, 8), (64, 64), "nchw"),  # as many channels as the side: PyTorch's own layout
    ((1, 6, 8, 8), (8, 8), "nchw"),
    ((1, 8, 8, 6), (8, 8), "nhwc"),
    ((1, 768, 7, 10), (224, 320), "nchw"),
    ((1, 7, 10, 768), (224, 320), "nhwc"),
    ((1, 1, 1, 768), (224, 224), None),  # a channels-last pooled output: 1x1
    ((1, 768, 1, 1), (224, 224), None),
])
def test_a_four_dimensional_output_is_read_by_the_image_aspect_ratio(shape, image, reading):
    from camlens.capture import _reading

    assert _reading(torch.Size(shape), image) == reading


def test_the_command_line_explains_a_transformer_with_no_layer_given(vit_module, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (20, 20), (200, 30, 90)).save(photo)
    out = tmp_path / "out"
    code, _, err = run(["explain", photo, *vit_module, "-m", "gradcam", "-m", "scorecam", "-m", "cam", "--out", out,
                        "--no-optimize"], capsys)
    assert code == 1 and "CAM" in err  # CAM was asked for: its head reads the class token, not a pooled map
    code, printed, err = run(["explain", photo, *vit_module, "--out", out], capsys)
    assert code == 0, err
    assert "CAM skipped: the model's output is not fc(global average pool of layer 'blocks.0')" in printed
    assert "Traceback" not in err
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_layers"] == [LAYER] and manifest["default_layer"] is True
    assert manifest["layout"] == "tokens:2:4x4"


def test_a_map_flattened_channels_first_is_not_read_as_tokens():
    """(N, C, h*w) after the last map (a head that flattens before pooling) holds channels, not
    tokens: the default stays the map, never a grid made of channels."""
    from camlens.capture import default_layer

    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, stride=2), nn.ReLU())
            self.flatten = nn.Flatten(2)
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(self.flatten(self.features(x)).mean(dim=2))

    found = default_layer(Flattening().eval(), torch.randn(1, 3, 16, 16))
    assert (found.name, found.layout) == ("features", None)
