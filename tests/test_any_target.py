"""Any target (functions of the model's output, the ready-made ones) and any output (tuples,
dicts, objects with .logits, picked by the ``output=`` option)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import camlens
from camlens import (
    CamlensError,
    ClassTarget,
    MultiLabelTarget,
    RegressionTarget,
    SemanticSegmentationTarget,
    SimilarityTarget,
)
from camlens.evaluate import evaluate_image
from conftest import make_tiny
from helpers import Head, Segmenter, build, by_hand

LAYER = "features"


def seeded(cls) -> dict:
    return {"seed": 0} if "seed" in inspect.signature(cls).parameters else {}


def layer_gradcam(model, images, score):
    """Grad-CAM by hand: ``score(output)`` (N,) differentiated with respect to ``features``."""
    return by_hand(model, images, score)[2]


# -- target functions ----------------------------------------------------------------------------

def test_a_function_equals_the_class_it_reads(tiny, images):
    by_class = camlens.GradCAM(tiny, LAYER)(images, 3)
    by_function = camlens.GradCAM(tiny, LAYER)(images, lambda out: out[:, 3])
    torch.testing.assert_close(by_function.maps, by_class.maps, rtol=0, atol=0)
    torch.testing.assert_close(by_function.scores, by_class.scores, rtol=0, atol=0)
    assert by_function.targets.tolist() == [[-1]] * 3
    assert by_function.probabilities is None and by_function.score_kind == "target"


def test_functions_per_image_and_several_per_image(tiny, images):
    per_image = [lambda out, c=c: out[:, c] for c in (1, 3, 0)]
    torch.testing.assert_close(camlens.GradCAM(tiny, LAYER)(images, per_image).maps,
                               camlens.GradCAM(tiny, LAYER)(images, [1, 3, 0]).maps, rtol=0, atol=0)
    classes = [[1, 2], [3, 4], [0, 1]]
    functions = [[lambda out, c=c: out[:, c] for c in row] for row in classes]
    got = camlens.GradCAMPlusPlus(tiny, LAYER)(images, functions)
    torch.testing.assert_close(got.maps, camlens.GradCAMPlusPlus(tiny, LAYER)(images, classes).maps, rtol=0, atol=0)
    assert got.targets.shape == (3, 2)


CLASSES_ONLY = ("cam", "gradcam++-general")  # their formulas read the classifier or the softmax


@pytest.mark.parametrize("name", [name for name in camlens.METHODS if name not in CLASSES_ONLY])
def test_every_method_takes_a_function(name, tiny, images):
    """Gradient methods differentiate it, the others call it on batches of perturbed inputs
    (per image here, so that the rows of each batch go to the right function)."""
    cls = camlens.METHODS[name]
    classes = [2, 0, 4]
    functions = [lambda out, c=c: out[:, c] for c in classes]
    by_class = cls(tiny, LAYER, **seeded(cls))(images, ClassTarget(classes, score="logit"))
    by_function = cls(tiny, LAYER, **seeded(cls))(images, functions)
    torch.testing.assert_close(by_function.maps, by_class.maps, rtol=1e-9, atol=1e-12)


def test_scorecam_softmax_function_equals_its_probability_score(tiny, images):
    probability = camlens.ScoreCAM(tiny, LAYER, batch_size=5)(images, 1)  # the paper's score
    function = camlens.ScoreCAM(tiny, LAYER, batch_size=5)(images, lambda out: out.softmax(1)[:, 1])
    torch.testing.assert_close(function.weights[LAYER], probability.weights[LAYER], rtol=1e-12, atol=1e-14)


def test_cam_refuses_a_function(tiny, images):
    with pytest.raises(CamlensError, match="CAM explains classes only"):
        camlens.CAM(tiny, LAYER)(images, lambda out: out[:, 0])


# -- ready-made targets --------------------------------------------------------------------------

def test_semantic_segmentation_target(images):
    model = build(Segmenter)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1:4, 2:5] = True
    explanation = camlens.GradCAM(model, LAYER)(images, SemanticSegmentationTarget(2, mask))
    expected = layer_gradcam(model, images, lambda out: (out[:, 2] * mask).sum(dim=(1, 2)))
    torch.testing.assert_close(explanation.raw[LAYER][:, 0], expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        sums = torch.stack([model(image[None])[0, 2][mask].sum() for image in images])
    torch.testing.assert_close(explanation.scores[:, 0], sums, rtol=1e-12, atol=1e-12)


def test_segmentation_masks_per_image_follow_their_image_in_perturbed_batches(images):
    """Score-CAM's masked inputs mix images in a batch: each row must get its own image's mask."""
    model = build(Segmenter)
    torch.manual_seed(4)
    masks = torch.rand(3, 6, 6) > 0.5
    method = camlens.ScoreCAM(model, LAYER, batch_size=5)
    batch = method(images, SemanticSegmentationTarget(1, masks))
    for index, image in enumerate(images):
        alone = method(image[None], SemanticSegmentationTarget(1, masks[index]))
        torch.testing.assert_close(batch.weights[LAYER][index], alone.weights[LAYER][0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(batch.weights[LAYER][0], batch.weights[LAYER][1])


def test_multi_label_target(images):
    model = build(Head, 6)
    logit = camlens.GradCAM(model, LAYER)(images, MultiLabelTarget(4))
    probability = camlens.GradCAM(model, LAYER)(images, MultiLabelTarget(4, score="probability"))
    with torch.no_grad():
        z = model(images)[:, 4]
    torch.testing.assert_close(logit.scores[:, 0], z, rtol=0, atol=0)
    torch.testing.assert_close(probability.scores[:, 0], torch.sigmoid(z), rtol=0, atol=0)
    # d sigmoid(z) = sigmoid(z) (1 - sigmoid(z)) dz: the same weights, scaled per image.
    slope = torch.sigmoid(z) * (1 - torch.sigmoid(z))
    torch.testing.assert_close(probability.weights[LAYER][:, 0], slope[:, None] * logit.weights[LAYER][:, 0],
                               rtol=1e-10, atol=1e-14)


def test_regression_target(images):
    for model in (build(Head, 1), build(Head, 1, squeeze=True)):
        explanation = camlens.GradCAM(model, LAYER)(images, RegressionTarget())
        expected = layer_gradcam(model, images, lambda out: out.reshape(-1))
        torch.testing.assert_close(explanation.raw[LAYER][:, 0], expected, rtol=1e-10, atol=1e-12)
    model = build(Head, 3)
    explanation = camlens.GradCAM(model, LAYER)(images, RegressionTarget(2))
    torch.testing.assert_close(explanation.raw[LAYER][:, 0], layer_gradcam(model, images, lambda out: out[:, 2]),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(CamlensError, match=r"a regression output is \(N,\) or \(N, 1\), got shape \(3, 3\): name"):
        camlens.GradCAM(model, LAYER)(images, RegressionTarget())


def test_similarity_target(images):
    model = build(Head, 5)
    torch.manual_seed(5)
    reference = torch.randn(5, dtype=torch.float64)
    explanation = camlens.GradCAM(model, LAYER)(images, SimilarityTarget(reference))

    def cosine(out):
        return (out @ reference) / (out.norm(dim=1) * reference.norm())

    with torch.no_grad():
        torch.testing.assert_close(explanation.scores[:, 0], cosine(model(images)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(explanation.raw[LAYER][:, 0], layer_gradcam(model, images, cosine),
                               rtol=1e-9, atol=1e-12)
    per_image = torch.randn(3, 5, dtype=torch.float64)
    batch = camlens.ScoreCAM(model, LAYER)(images, SimilarityTarget(per_image))
    alone = camlens.ScoreCAM(model, LAYER)(images[2:], SimilarityTarget(per_image[2]))
    torch.testing.assert_close(batch.weights[LAYER][2], alone.weights[LAYER][0], rtol=1e-10, atol=1e-12)


def test_ready_made_targets_refuse_the_wrong_output(tiny, images):
    with pytest.raises(CamlensError, match=r"a segmentation output is \(N, classes, H, W\), got shape \(3, 5\)"):
        camlens.GradCAM(tiny, LAYER)(images, SemanticSegmentationTarget(0, torch.ones(6, 6)))
    segmenter = build(Segmenter)
    with pytest.raises(CamlensError, match=r"the segmentation mask is \(5, 5\) but the model's output is \(6, 6\)"):
        camlens.GradCAM(segmenter, LAYER)(images, SemanticSegmentationTarget(0, torch.ones(5, 5)))
    with pytest.raises(CamlensError, match=r"the mask of shape \(2, 6, 6\) has no entry for image 2"):
        camlens.GradCAM(segmenter, LAYER)(images, SemanticSegmentationTarget(0, torch.ones(2, 6, 6)))
    with pytest.raises(CamlensError, match=r"class 9 of an output of shape \(3, 4, 6, 6\)"):
        camlens.GradCAM(segmenter, LAYER)(images, SemanticSegmentationTarget(9, torch.ones(6, 6)))
    with pytest.raises(CamlensError, match="the reference embedding has 4 values but the model's output 5"):
        camlens.GradCAM(tiny, LAYER)(images, SimilarityTarget(torch.ones(4)))
    with pytest.raises(CamlensError, match="the label is an integer index >= 0, got -1"):
        MultiLabelTarget(-1)
    with pytest.raises(CamlensError, match="unknown score 'sigmoid'"):
        MultiLabelTarget(0, score="sigmoid")


def test_bad_functions_give_one_clear_error(tiny, images):
    method = camlens.GradCAM(tiny, LAYER)
    with pytest.raises(CamlensError, match=r"returned a tensor of shape \(3, 5\) for an output of shape \(3, 5\): "
                                           r"a target function returns one float score per row, shape \(3,\)"):
        method(images, lambda out: out)
    with pytest.raises(CamlensError, match=r"failed on the model's output of shape \(3, 5\): IndexError") as error:
        method(images, lambda out: out[:, 7])
    assert isinstance(error.value.__cause__, IndexError)
    with pytest.raises(CamlensError, match="a target function must compute its score from the model's output with "
                                           "torch operations"):
        method(images, lambda out: out[:, 0].detach())
    with pytest.raises(CamlensError, match=r"2 target functions \(or lists of them\) for 3 image\(s\)"):
        method(images, [lambda out: out[:, 0]] * 2)
    with pytest.raises(CamlensError, match="targets mix functions with other kinds"):
        method(images, [lambda out: out[:, 0], 1, 2])
    with pytest.raises(CamlensError, match="the same number of target functions"):
        method(images, [[lambda out: out[:, 0]], [lambda out: out[:, 0]] * 2, [lambda out: out[:, 0]]])


def test_class_targets_need_class_scores(images):
    with pytest.raises(CamlensError, match=r"class targets need class scores \(N, classes\), but the model's output "
                                           r"is a tensor of shape \(3, 4, 6, 6\): .* target function"):
        camlens.GradCAM(build(Segmenter), LAYER)(images)


# -- any output ----------------------------------------------------------------------------------

@dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor


class Wrapped(nn.Module):
    """make_tiny's classifier, its output wrapped by ``shape`` (logits, features) -> anything."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.net = make_tiny()
        self.shape = shape

    def forward(self, x):
        features = self.net.features(x)
        logits = self.net.fc(self.net.pool(features).flatten(1))
        return self.shape(logits, features)


@pytest.mark.parametrize("shape, output", [
    (lambda logits, features: (logits,), None),
    (lambda logits, features: [None, logits, 3], None),
    (lambda logits, features: {"logits": logits, "features": features}, None),
    (lambda logits, features: {"scores": logits}, None),
    (lambda logits, features: Output(logits, features), None),
    (lambda logits, features: (features, logits), 1),
    (lambda logits, features: {"a": features, "b": logits}, "b"),
    (lambda logits, features: Output(features, logits), "features"),
    (lambda logits, features: (features, {"deep": [logits]}), lambda out: out[1]["deep"][0]),
])
@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_outputs_picked_give_the_plain_models_maps(shape, output, method, tiny, images):
    expected = camlens.explain(tiny, images, method, "features", 2)
    got = camlens.explain(Wrapped(shape), images, method, "net.features", 2, output=output)
    torch.testing.assert_close(got.maps, expected.maps, rtol=0, atol=0)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)


def test_ambiguous_or_missing_outputs_give_one_clear_error(images):
    pair = Wrapped(lambda logits, features: (logits, logits.softmax(1)))
    with pytest.raises(CamlensError, match=r"^the model returned tuple; camlens needs class scores of shape \(3, "
                                           r"classes\), or one output per image for a target function: it holds 0 "
                                           r"\(3, 5\), 1 \(3, 5\); pick one with output= \(--output on the command "
                                           r"line: an index, a key, an attribute name, or in Python a function of "
                                           r"the model's output\)$"):
        camlens.GradCAM(pair, "net.features")(images)
    camlens.GradCAM(pair, "net.features", output=0)(images)
    two = Wrapped(lambda logits, features: {"a": logits, "b": features})
    with pytest.raises(CamlensError, match=r"the model returned dict; .*: it holds 'a' \(3, 5\), 'b' \(3, 8, 6, 6\)"):
        camlens.GradCAM(two, "net.features")(images)
    with pytest.raises(CamlensError, match=r"output='c': the model returned dict, which has no element 'c'; it holds"):
        camlens.GradCAM(two, "net.features", output="c")(images)
    with pytest.raises(CamlensError, match=r"output=2: the model returned tuple, which has no element 2"):
        camlens.GradCAM(pair, "net.features", output=2)(images)
    with pytest.raises(CamlensError, match=r"output='logits': the model returned tuple, which has no attribute"):
        camlens.GradCAM(pair, "net.features", output="logits")(images)
    with pytest.raises(CamlensError, match=r"output=0 picks from a tuple, list, dict or object, but the model "
                                           r"returned a tensor of shape \(3, 5\): leave output=None"):
        camlens.GradCAM(make_tiny(), "features", output=0)(images)
    with pytest.raises(CamlensError, match=r"output=.* picks float in what the model returned, not a tensor"):
        camlens.GradCAM(pair, "net.features", output=lambda out: 1.0)(images)
    with pytest.raises(CamlensError, match="output must be None .* not float"):
        camlens.GradCAM(pair, "net.features", output=1.5)
    with pytest.raises(CamlensError, match=r"the model returned tuple, and output=0 picks a tensor of shape "
                                           r"\(5,\); camlens needs class scores of shape \(3, classes\)"):
        camlens.GradCAM(Wrapped(lambda logits, features: (logits[0],)), "net.features", output=0)(images)


def test_a_segmentation_dict_output_with_a_segmentation_target(images):
    """torchvision's segmentation models return {'out': ..., 'aux': ...}."""

    class DictSegmenter(Segmenter):
        def forward(self, x):
            out = super().forward(x)
            return {"out": out, "aux": out.detach() * 2}

    model = build(DictSegmenter)
    target = SemanticSegmentationTarget(3, torch.ones(6, 6))
    with pytest.raises(CamlensError, match=r"it holds 'out' \(3, 4, 6, 6\), 'aux' \(3, 4, 6, 6\)"):
        camlens.GradCAM(model, LAYER)(images, target)
    got = camlens.GradCAM(model, LAYER, output="out")(images, target)
    plain = build(Segmenter)
    torch.testing.assert_close(got.maps, camlens.GradCAM(plain, LAYER)(images, target).maps, rtol=0, atol=0)
    assert got.options == {"output": "out"}


def test_outputs_through_the_inference_copy_and_the_metrics(tiny, images):
    """The copy runs the wrapped model, the metrics score its picked logits (fast_forward)."""
    wrapped = Wrapped(lambda logits, features: Output(features, logits))
    plain = camlens.GradCAM(tiny, "features", optimize=True)
    method = camlens.GradCAM(wrapped, "net.features", optimize=True, output="features")
    torch.testing.assert_close(method(images, 1).maps, plain(images, 1).maps, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(method.fast_forward(images)(images), tiny(images), rtol=1e-6, atol=1e-8)
    got = evaluate_image(method, images[0], 1, [], ["drop", "deletion"], steps=4)
    expected = evaluate_image(plain, images[0], 1, [], ["drop", "deletion"], steps=4)
    assert got.pop("deletion_curve") == pytest.approx(expected.pop("deletion_curve"), abs=2e-6)
    assert got == pytest.approx(expected, rel=1e-6)
    assert got["explained_probability"] != got["probability"]


def test_compiled_forward_picks_the_output(images, monkeypatch, tmp_path):
    """A real torch.compile of a model that returns a dict: Score-CAM's masked inputs and the
    metrics' inputs go through the compiled copy in padded batches, the logits picked in each."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = Wrapped(lambda logits, features: {"a": features, "b": logits}).float()
    plain = make_tiny().float()
    x = images.float()
    fast = camlens.explain(model, x, "scorecam", "net.features", compile=True, batch_size=4, output="b")
    expected = camlens.explain(plain, x, "scorecam", "features", batch_size=4)
    assert (fast.maps - expected.maps).abs().max() <= 1e-5
    method = camlens.GradCAM(model, "net.features", compile=True, output="b")
    got = evaluate_image(method, x[0], 1, [], ["drop", "deletion"], steps=5, batch_size=4)
    slow = evaluate_image(camlens.GradCAM(plain, "features"), x[0], 1, [], ["drop", "deletion"], steps=5, batch_size=4)
    assert got["deletion_curve"] == pytest.approx(slow["deletion_curve"], abs=1e-5)
