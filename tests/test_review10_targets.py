"""Review of issue 10's targets, output selectors, token grids and command-line wiring: each
ready-made target against a score and gradient written by hand on a tiny float64 model, batch
against one by one, bad inputs as one clear error, and the command line with many methods."""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens import (
    CamlensError,
    MultiLabelTarget,
    RegressionTarget,
    SemanticSegmentationTarget,
    SimilarityTarget,
)
from camlens.capture import TokenGrid, token_grid
from camlens.cli.explain import ImageResult, print_summary
from camlens.cli.info import _token_note
from camlens.methods import METHODS, list_methods
from camlens.methods.meta import smoothed

from conftest import make_tiny
from helpers import NET_MODELS, Head, Segmenter, build, by_hand, model_module, random_photo, run
from test_vit import make_vit

LAYER = "features"


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


def close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


# -- ready-made targets against hand-written scores --------------------------------------------------

def test_segmentation_target_is_the_class_summed_over_the_mask_with_its_gradient(images):
    model = build(Segmenter)
    torch.manual_seed(2)
    masks = torch.rand(3, 6, 6, dtype=torch.float64) * (torch.rand(3, 6, 6) > 0.4)
    category = 2

    def score(output):  # a plain loop over images and pixels
        return torch.stack([
            sum(output[n, category, i, j] * masks[n, i, j] for i in range(6) for j in range(6))
            for n in range(output.shape[0])
        ])

    scores, weights, raw = by_hand(model, images, score)
    explanation = camlens.GradCAM(model, LAYER)(images, SemanticSegmentationTarget(category, masks))
    close(explanation.scores[:, 0], scores)
    close(explanation.weights[LAYER][:, 0], weights)  # Grad-CAM's weights: the mean gradient
    close(explanation.raw[LAYER][:, 0], raw)
    assert explanation.score_kind == "target" and explanation.targets.tolist() == [[-1]] * 3
    # A boolean mask is the 0/1 weight mask.
    binary = masks > 0
    flat = camlens.GradCAM(model, LAYER)(images, SemanticSegmentationTarget(category, binary))
    close(flat.scores[:, 0], by_hand(model, images, lambda out: (out[:, category] * binary).sum((1, 2)))[0])


@pytest.mark.parametrize("name", ["gradcam", "hirescam", "scorecam", "ablationcam"])
def test_per_image_masks_batch_equals_one_by_one(name, images):
    """Batches of perturbed inputs mix images (batch_size 2): each row is scored with its mask."""
    model = build(Segmenter)
    torch.manual_seed(3)
    masks = (torch.rand(3, 6, 6) > 0.5).double()
    cls = METHODS[name]
    options = {"batch_size": 2} if "batch_size" in cls.__init__.__code__.co_varnames else {}
    batch = cls(model, LAYER, **options)(images, SemanticSegmentationTarget(1, masks))
    for n in range(3):
        alone = cls(model, LAYER, **options)(images[n:n + 1], SemanticSegmentationTarget(1, masks[n]))
        torch.testing.assert_close(batch.maps[n], alone.maps[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(batch.scores[n], alone.scores[0], rtol=1e-12, atol=1e-12)


def test_an_empty_mask_gives_a_zero_score_and_a_blank_map_not_an_error(images):
    model = build(Segmenter)
    explanation = camlens.GradCAM(model, LAYER)(images, SemanticSegmentationTarget(0, torch.zeros(6, 6)))
    assert explanation.scores.abs().max() == 0 and explanation.maps.abs().max() == 0


def test_per_image_data_for_more_images_than_given_is_refused(images):
    """Fault: a mask or reference per image for 5 images, with 3 images explained, was read for the
    first 3 in silence (data meant for other images)."""
    with pytest.raises(CamlensError, match=r"the mask of shape \(5, 6, 6\) holds 5 entries for 3 image\(s\)"):
        camlens.GradCAM(build(Segmenter), LAYER)(images, SemanticSegmentationTarget(1, torch.ones(5, 6, 6)))
    reference = torch.ones(5, 6, dtype=torch.float64)
    with pytest.raises(CamlensError, match=r"the reference of shape \(5, 6\) holds 5 entries for 3 image\(s\)"):
        camlens.ScoreCAM(build(Head, 6), LAYER)(images, SimilarityTarget(reference))
    with pytest.raises(CamlensError, match=r"the mask of shape \(2, 6, 6\) has no entry for image 2"):
        camlens.GradCAM(build(Segmenter), LAYER)(images, SemanticSegmentationTarget(1, torch.ones(2, 6, 6)))


def test_multi_label_scores_are_the_logit_its_sigmoid_or_its_exp(images):
    """Fault: score='exp' was accepted and gave the sigmoid."""
    model = build(Head, 4)
    expected = {
        "logit": lambda out: out[:, 2],
        "probability": lambda out: 1 / (1 + torch.exp(-out[:, 2])),
        "exp": lambda out: torch.exp(out[:, 2]),
    }
    for kind, score in expected.items():
        scores, weights, raw = by_hand(model, images, score)
        explanation = camlens.GradCAM(model, LAYER)(images, MultiLabelTarget(2, score=kind))
        close(explanation.scores[:, 0], scores)
        close(explanation.weights[LAYER][:, 0], weights)
        close(explanation.raw[LAYER][:, 0], raw)


def test_regression_and_similarity_against_hand_written_scores(images):
    for model, target, score in (
        (build(Head, 1, squeeze=True), RegressionTarget(), lambda out: out),
        (build(Head, 1), RegressionTarget(), lambda out: out[:, 0]),
        (build(Head, 3), RegressionTarget(2), lambda out: out[:, 2]),
    ):
        scores, weights, raw = by_hand(model, images, score)
        explanation = camlens.GradCAM(model, LAYER)(images, target)
        close(explanation.scores[:, 0], scores)
        close(explanation.weights[LAYER][:, 0], weights)
    model = build(Head, 6)
    torch.manual_seed(4)
    references = torch.randn(3, 6, dtype=torch.float64)

    def cosine(out):
        return (out * references).sum(1) / (out.norm(dim=1) * references.norm(dim=1))

    scores, weights, raw = by_hand(model, images, cosine)
    explanation = camlens.GradCAM(model, LAYER)(images, SimilarityTarget(references))
    close(explanation.scores[:, 0], scores)
    close(explanation.weights[LAYER][:, 0], weights)
    close(explanation.raw[LAYER][:, 0], raw)
    one = camlens.GradCAM(model, LAYER)(images, SimilarityTarget(references[1]))
    close(one.scores[1, 0], scores[1])


def test_errors_name_the_problem(images):
    """Faults: 'classs' in the message; a target returning integers was told to return shape (3,),
    which it had; a similarity target on one value per image failed with an IndexError."""
    with pytest.raises(CamlensError, match=r"class 9 of an output of shape \(3, 4, 6, 6\): the model's output has 4 "
                                           r"classes \(valid: 0 to 3"):
        camlens.GradCAM(build(Segmenter), LAYER)(images, SemanticSegmentationTarget(9, torch.ones(6, 6)))
    with pytest.raises(CamlensError, match=r"returned a tensor of shape \(3,\) of torch.int64"):
        camlens.GradCAM(build(Head, 4), LAYER)(images, lambda out: out.argmax(1))
    with pytest.raises(CamlensError, match=r"an embedding output is \(N, D\), got shape \(3,\)"):
        camlens.GradCAM(build(Head, 1, squeeze=True), LAYER)(images, SimilarityTarget(torch.ones(1)))
    with pytest.raises(CamlensError, match=r"output 1 of an output of shape \(3,\): the model's output holds one value "
                                           r"per image"):
        camlens.GradCAM(build(Head, 1, squeeze=True), LAYER)(images, RegressionTarget(1))
    with pytest.raises(CamlensError, match="a reference embedding is a float tensor .* of torch.int64"):
        SimilarityTarget(torch.ones(6, dtype=torch.long))


# -- output selectors ---------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "features logits")


@dataclasses.dataclass
class Out:
    features: torch.Tensor
    scores: torch.Tensor


@dataclasses.dataclass(slots=True)
class SlotOut:
    features: torch.Tensor
    scores: torch.Tensor


class Returns(nn.Module):
    """The tiny network, returning its logits inside ``kind`` of container."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = make_tiny()
        self.kind = kind

    def forward(self, x):
        a = self.net.features(x)
        pooled = a.mean(dim=(2, 3))
        logits, extra = self.net.fc(pooled), pooled[:, :4]
        return {
            "nested": ((logits, extra), extra),
            "nested_dict": {"out": {"logits": logits}, "aux": extra},
            "wrapped": ((logits, extra),),
            "namedtuple": Pair(extra, logits),
            "dataclass": Out(extra, logits),
            "slots": SlotOut(extra, logits),
            "single": (logits, None),
        }[self.kind]


def test_a_tensor_beside_nested_tensors_is_ambiguous_not_picked():
    """Fault: ((logits, features), aux) made camlens explain aux, the one tensor at the top, in
    silence; {'out': {...}, 'aux': t} likewise."""
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(CamlensError, match=r"it holds 0 \(tuple of 2 tensors\), 1 \(2, 4\); pick one with output=.*"
                                           r"e.g. output=lambda out: out\[0\]\[0\]"):
        camlens.GradCAM(Returns("nested"), "net.features")(x)
    with pytest.raises(CamlensError, match=r"'out' \(dict of 1 tensor\), 'aux' \(2, 4\).*out\['out'\]\['logits'\]"):
        camlens.GradCAM(Returns("nested_dict"), "net.features")(x)
    with pytest.raises(CamlensError, match=r"it holds 0 \(tuple of 2 tensors\)"):  # was: 'it holds no tensor'
        camlens.GradCAM(Returns("wrapped"), "net.features")(x)
    with pytest.raises(CamlensError, match=r"it holds 'features' \(2, 4\), 'scores' \(2, 5\)"):  # slots dataclass
        camlens.GradCAM(Returns("slots"), "net.features")(x)
    with pytest.raises(CamlensError, match=r"output='nope'.*no attribute 'nope'; it holds 'features'"):
        camlens.GradCAM(Returns("slots"), "net.features", output="nope")(x)


@pytest.mark.parametrize("kind, output", [
    ("nested", lambda out: out[0][0]), ("nested_dict", lambda out: out["out"]["logits"]),
    ("namedtuple", None), ("namedtuple", "logits"), ("namedtuple", 1), ("dataclass", "scores"),
    ("slots", "scores"), ("single", None),
])
def test_selected_outputs_explain_what_the_plain_model_does(kind, output, images):
    plain = camlens.GradCAM(make_tiny(), LAYER)(images, 2)
    got = camlens.GradCAM(Returns(kind), "net.features", output=output)(images, 2)
    torch.testing.assert_close(got.maps, plain.maps, rtol=0, atol=0)
    scored = camlens.ScoreCAM(Returns(kind), "net.features", output=output, batch_size=3)(images, 2)
    torch.testing.assert_close(scored.maps, camlens.ScoreCAM(make_tiny(), LAYER, batch_size=3)(images, 2).maps,
                               rtol=1e-12, atol=1e-12)


# -- token grids ----------------------------------------------------------------------------------------

def hand_tokens(model, images, prefix, h, w, target):
    """Grad-CAM on the first block's tokens, reshaped by hand to an h x w grid (row-major)."""
    kept = {}
    handle = model.blocks[0].register_forward_hook(lambda m, i, out: kept.setdefault("t", out))
    try:
        logits = model(images)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, target].sum(), kept["t"])
    tokens = kept["t"][:, prefix:].reshape(len(images), h, w, -1).permute(0, 3, 1, 2)
    gradient = grad[:, prefix:].reshape(len(images), h, w, -1).permute(0, 3, 1, 2)
    return torch.relu((gradient.mean(dim=(2, 3))[..., None, None] * tokens).sum(1)).detach()


@pytest.mark.parametrize("spec, prefix, h, w", [
    ("tokens:2:2x8", 2, 2, 8), ("tokens:8x2", 2, 8, 2), (TokenGrid(prefix=2, size=(1, 16)), 2, 1, 16),
])
def test_a_grid_given_explicitly_need_not_be_the_image_shape(spec, prefix, h, w):
    model = make_vit()
    torch.manual_seed(5)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    explanation = camlens.GradCAM(model, "blocks.0", reshape=spec)(x, 1)
    assert explanation.raw["blocks.0"].shape == (3, 1, h, w)
    close(explanation.raw["blocks.0"][:, 0], hand_tokens(model, x, prefix, h, w, 1))
    one = camlens.GradCAM(model, "blocks.0", reshape=spec)(x[2:], 1)
    close(one.raw["blocks.0"][0], explanation.raw["blocks.0"][2])


def test_register_tokens_with_the_prefix_given():
    model = make_vit(registers=3)  # 1 + 3 + 16 tokens
    torch.manual_seed(6)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for spec in ("tokens", "tokens:4", "tokens:4:4x4", "tokens:4x4"):
        got = camlens.GradCAM(model, "blocks.0", reshape=spec)(x, 0)
        close(got.raw["blocks.0"][:, 0], hand_tokens(model, x, 4, 4, 4, 0))
    with pytest.raises(CamlensError, match=r"its 20 tokens less 3 prefix token\(s\) leave 17, which make no grid"):
        camlens.GradCAM(model, "blocks.0", reshape="tokens:3")(x)
    with pytest.raises(CamlensError, match=r"its 20 tokens are not 3 prefix token\(s\) and a 4x4 grid"):
        camlens.GradCAM(model, "blocks.0", reshape="tokens:3:4x4")(x)


@pytest.mark.parametrize("bad", ["tokens:", "tokens:x", "tokens::4x4", "tokens:-1", "tokens:4x4:2", "grid",
                                 "tokens:0x4", 5])
def test_bad_reshape_specs_are_one_clear_error(bad):
    with pytest.raises(CamlensError) as error:
        token_grid(bad)
    assert "\n" not in str(error.value)


def test_layers_note_reads_sequence_first_tokens():
    assert _token_note(torch.Size([1, 18, 16]), 16) == "tokens: --reshape tokens reads 2 + 4x4"
    assert _token_note(torch.Size([18, 1, 16]), 16) == "tokens, (L, N, D): --reshape tokens reads 2 + 4x4"
    assert _token_note(torch.Size([1, 8, 16, 16]), 16) == ""


# -- the command line -------------------------------------------------------------------------------------

@pytest.fixture
def tiny_cli(tmp_path, monkeypatch):
    model_module(tmp_path, "review10_models", NET_MODELS, monkeypatch)
    photo = random_photo(tmp_path / "photo.png", 20, 24)
    return photo, ["--model", "review10_models:net", "--input-size", "16"]


def test_bad_options_are_one_line_errors(tiny_cli, tmp_path, capsys):
    photo, model = tiny_cli
    for args, code, text in (
        (["-m", "gradcam", "--reshape", "tokens:2x"], 2, "unknown reshape 'tokens:2x'"),
        (["-m", "nosuchcam"], 1, "unknown method 'nosuchcam'"),
        (["-m", "gradcam", "--top-channels", "4"], 1, "--top-channels applies to"),
    ):
        got, _, err = run(["explain", photo, *model, "--out", tmp_path / "o", *args], capsys)
        assert got == code and text in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_explain_every_method_with_eigen_smoothing(tiny_cli, tmp_path, capsys):
    """-m all reaches every method; with --eigen-smooth the one that refuses it (Recipro-CAM, a map
    that is no weighted sum of channels) is left out with a note, as CAM is where it does not fit.
    Fault: the whole run failed on Recipro-CAM's error."""
    photo, model = tiny_cli
    out = tmp_path / "o"
    code, stdout, err = run(["explain", photo, *model, "-m", "all", "--eigen-smooth", "--batch-size", "3",
                             "--top-channels", "4", "--seed", "3", "--out", out], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["methods"]) == set(METHODS) - {"reciprocam"}
    assert "reciprocam" in manifest["skipped_methods"]
    assert manifest["options"]["sscam"]["top_channels"] == 4 and manifest["options"]["sscam"]["seed"] == 3
    assert manifest["options"]["ablationcam"]["batch_size"] == 3
    assert all(manifest["options"][name]["eigen_smooth"] for name in manifest["methods"])
    saved = np.load(out / "photo" / "maps.npz")
    for name in manifest["methods"]:
        assert saved[f"{name}/maps"].shape == (1, 16, 16)
    # The summary names every method whole, one per row (no column squeezed to 'Grad…').
    for name in manifest["methods"]:
        assert METHODS[name].display_name in stdout
    assert "…" not in stdout
    code, _, err = run(["explain", photo, *model, "-m", "reciprocam", "--eigen-smooth", "--out", out], capsys)
    assert code == 1 and "Recipro-CAM's map is not a weighted sum of channels" in err  # named: its error stands


def summary(methods, chosen_class, capsys):
    results = []
    for index in range(2):
        result = ImageResult(__import__("pathlib").Path(f"photo_{index}.png"))
        result.targets = result.predictions = [{"class": 3, "name": "tabby cat", "probability": 0.51}]
        result.timings = {name: 0.25 * (k + 1) for k, name in enumerate(methods)}
        results.append(result)
    results.append(ImageResult(__import__("pathlib").Path("broken.png"), status="failed", error="x"))
    print_summary(results, methods, __import__("pathlib").Path("out"), chosen_class, {"cam": "no GAP head"}, [])
    return capsys.readouterr().out


def rows(text):
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_summary_with_many_methods_is_one_row_per_method(capsys):
    """Fault: 16 methods made 16 columns squeezed to 'Grad…' at any width."""
    methods = [name for name in METHODS if name != "cam"]
    text = summary(methods, False, capsys)
    assert "…" not in text
    table = rows(text)
    per_method = {row[1]: row for row in table if row[1] in METHODS}
    assert list(per_method) == methods
    for k, name in enumerate(methods):
        assert per_method[name][0] == METHODS[name].display_name
        assert per_method[name][2:] == [f"{0.25 * (k + 1):.2f}", f"{0.5 * (k + 1):.2f}"]  # per image, total
    images = [row for row in table if row[0].startswith(("photo_", "broken"))]
    total = sum(0.25 * (k + 1) for k in range(len(methods)))
    assert images[0] == ["photo_0.png", "tabby cat", "0.51", f"{total:.2f}", "ok"]
    assert images[2] == ["broken.png", "-", "-", "-", "failed"]
    assert "CAM skipped: no GAP head" in text


@pytest.mark.parametrize("count", [1, 3])
def test_summary_with_few_methods_keeps_a_column_each(count, capsys):
    methods = ["gradcam", "gradcam++", "scorecam"][:count]
    text = summary(methods, True, capsys)
    header = " ".join(text.split())
    for name in methods:
        assert f"{METHODS[name].display_name} s" in header
    table = rows(text)
    assert table[0] == ["photo_0.png", "tabby cat", "0.51", "tabby cat (0.51)",
                        *[f"{0.25 * (k + 1):.2f}" for k in range(count)], "ok"]
    assert table[2] == ["broken.png", "-", "-", "-", *["-"] * count, "failed"]


def test_methods_lists_every_method_with_its_cost(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert list(lines) == list(METHODS)
    for name, summary_ in list_methods().items():
        assert "forward" in summary_.split(";")[-1], name  # the cost per image, after the ';'
        assert summary_ in " ".join(lines[name].split()[1:]) or summary_ in lines[name]


def test_sanity_planned_passes_count_smoothing_and_top_channels():
    """Fault: a smoothed Score-CAM was not seen as one (isinstance on the wrapper): its plan said
    1 forward, and its map was timed in full, twice, before the run."""
    from camlens.cli.sanity import _passes

    model = make_tiny()
    scorecam = camlens.ScoreCAM(model, LAYER, top_channels=3)
    assert _passes(scorecam, 8) == 1 + 3
    assert _passes(smoothed(scorecam, aug_smooth=True), 8) == 6 * (1 + 3)
    assert _passes(smoothed(camlens.ScoreCAM(model, LAYER), aug_smooth=True, eigen_smooth=True), 8) == 6 * 9
    assert _passes(smoothed(camlens.ScoreCAM(model, LAYER, top_channels=0.5), eigen_smooth=True), 8) == 1 + 4
    assert _passes(smoothed(camlens.SmoothGradCAMPlusPlus(model, LAYER, n_samples=4), aug_smooth=True), 8) == 30


def test_sanity_takes_top_channels(tiny_cli, tmp_path, capsys):
    """Fault: camlens sanity had no --top-channels, the option that makes Score-CAM's variants
    affordable in a cascade."""
    photo, model = tiny_cli
    code, _, err = run(["sanity", photo, *model, "-m", "sscam", "--top-channels", "2", "--steps", "1",
                        "--aug-smooth", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    # SS-CAM: 6 augmented copies x (the clean forward + 2 channels x 35 noisy masks)
    assert "SS-CAM 426 forwards" in err.splitlines()[0]
    report = json.loads((tmp_path / "s" / "sanity.json").read_text())
    assert list(report["methods"]) == ["sscam"]
