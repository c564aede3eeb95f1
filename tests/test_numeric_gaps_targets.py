"""Issue 30: the gaps mutation testing found in targets.py: scores by hand, the edges of every
index check, and the one-line refusals (their words are the interface)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.errors import CamlensError
from camlens.targets import (
    ClassTarget,
    MultiLabelTarget,
    RegressionTarget,
    SemanticSegmentationTarget,
    SimilarityTarget,
    UnitTarget,
)


def rows(*indices):
    return torch.tensor(indices)


# -- units --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channel, position, message", [
    ("1", None, "a unit's channel is an integer index, got '1'"),
    (True, None, "a unit's channel is an integer index, got True"),
    (1, (1, 2, 3, 4), "a unit's position is None or a pair of integers (i, j) (one per dimension of the layer's map: (i,) for a signal, (d, i, j) for a volume), got (1, 2, 3, 4)"),
    (1, (), "a unit's position is None or a pair of integers (i, j) (one per dimension of the layer's map: (i,) for a signal, (d, i, j) for a volume), got ()"),
    (1, (1, "a"), "a unit's position is None or a pair of integers (i, j) (one per dimension of the layer's map: (i,) for a signal, (d, i, j) for a volume), got (1, 'a')"),
    (1, "ab", "a unit's position is None or a pair of integers (i, j) (one per dimension of the layer's map: (i,) for a signal, (d, i, j) for a volume), got 'ab'"),
])
def test_a_unit_is_a_channel_index_and_an_optional_pair(channel, position, message):
    with pytest.raises(CamlensError) as error:
        UnitTarget("0", channel, position)
    assert str(error.value) == message
    assert UnitTarget("0", 1, [2, 3]).position == (2, 3)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("position", [(0, 0), (0, 5), (3, 0), (3, 5)])
def test_a_unit_at_each_corner_of_the_map_is_its_activation_there(position):
    model = Conv().eval()
    x = torch.rand(1, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    expl = camlens.GradCAM(model, "conv")(x, UnitTarget("conv", 1, position))
    activation = model.conv(x).detach()
    # d A[1, i, j] / d A = one-hot at (1, i, j): Grad-CAM's weights are 1/(h w) on channel 1 alone.
    expected = torch.zeros(1, 1, 2)
    expected[0, 0, 1] = 1 / 24
    assert torch.allclose(expl.weights["conv"], expected, atol=1e-9)
    assert torch.allclose(expl.scores, activation[:, 1, position[0], position[1]][:, None])


@pytest.mark.parametrize("position, message", [
    ((4, 0), "unit position (4, 0) is outside layer 'conv''s 4x6 map"),
    ((0, 6), "unit position (0, 6) is outside layer 'conv''s 4x6 map"),
    ((-1, 0), "unit position (-1, 0) is outside layer 'conv''s 4x6 map"),
    ((1, 2, 3), "unit position (1, 2, 3) has 3 coordinate(s); layer 'conv''s 4x6 map has 2 dimension(s)"),
    ((1,), "unit position (1,) has 1 coordinate(s); layer 'conv''s 4x6 map has 2 dimension(s)"),
])
def test_a_unit_outside_the_map_is_refused(position, message):
    with pytest.raises(CamlensError) as error:
        camlens.GradCAM(Conv().eval(), "conv")(torch.rand(1, 3, 4, 6), UnitTarget("conv", 0, position))
    assert str(error.value) == message


def test_a_class_target_checks_its_score_kind():
    with pytest.raises(CamlensError, match="unknown score 'odds': choose one of"):
        ClassTarget(1, score="odds")


# -- data per image -------------------------------------------------------------------------------------

def test_data_per_image_must_cover_exactly_the_images():
    short = SemanticSegmentationTarget(0, torch.ones(1, 5, 5))
    with pytest.raises(CamlensError) as error:
        short.check(2)
    assert str(error.value) == ("the mask of shape (1, 5, 5) has no entry for image 1: give one for all images, "
                                "or one per image (images first) for the 2 image(s)")
    with pytest.raises(CamlensError) as error:
        SimilarityTarget(torch.ones(3, 4)).check(2)
    assert str(error.value) == ("the reference of shape (3, 4) holds 3 entries for 2 image(s): give one for all "
                                "images, or exactly one per image (images first)")
    SemanticSegmentationTarget(0, torch.ones(5, 5)).check(7)  # one for all images
    SemanticSegmentationTarget(0, torch.ones(2, 5, 5)).check(2)


def test_a_row_past_the_data_per_image_is_refused_not_an_index_error():
    target = SimilarityTarget(torch.ones(2, 3))
    output = torch.rand(2, 3)
    assert target.score(output, rows(0, 1)).shape == (2,)
    with pytest.raises(CamlensError) as error:
        target.score(output, rows(0, 2))
    assert str(error.value) == ("the reference of shape (2, 3) has no entry for image 2: give one for all images, "
                                "or one per image (images first)")


# -- each score target by hand -------------------------------------------------------------------------

def test_a_segmentation_score_is_the_masked_sum_in_the_outputs_precision():
    output = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    weights = torch.rand(2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = SemanticSegmentationTarget(2, weights).score(output, rows(1, 0))
    expected = [sum(float(output[b, 2, i, j]) * float(weights[m, i, j]) for i in range(4) for j in range(5))
                for b, m in ((0, 1), (1, 0))]
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-6)


def test_segmentation_refusals():
    with pytest.raises(CamlensError) as error:
        SemanticSegmentationTarget("x", torch.ones(2, 2))
    assert str(error.value) == "the category is an integer index >= 0, got 'x'"
    with pytest.raises(CamlensError) as error:
        SemanticSegmentationTarget(0, torch.ones(4))
    assert str(error.value) == "a segmentation mask is (H, W) or (N, H, W), got shape (4,)"
    with pytest.raises(CamlensError) as error:
        SemanticSegmentationTarget(3, torch.ones(2, 2)).score(torch.rand(1, 3, 2, 2), rows(0))
    assert str(error.value).startswith("class 3 of an output of shape (1, 3, 2, 2): the model's output has 3 "
                                       "classes (valid: 0 to 2;")


@pytest.mark.parametrize("kind", ["logit", "probability", "exp"])
def test_a_multi_label_score_by_hand(kind):
    output = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    got = MultiLabelTarget(1, score=kind)(output)
    logits = [-1.0, 0.25]
    expected = {"logit": logits, "probability": [1 / (1 + torch.e ** -z) for z in logits],
                "exp": [torch.e ** z for z in logits]}[kind]
    assert torch.allclose(got, torch.tensor(expected))


def test_multi_label_and_regression_refusals_name_the_label_or_the_output():
    with pytest.raises(CamlensError) as error:
        MultiLabelTarget(3)(torch.rand(2, 3))
    assert str(error.value) == ("label 3 of an output of shape (2, 3): the model's output has 3 labels "
                                "(valid: 0 to 2; pick another output with output=)")
    with pytest.raises(CamlensError) as error:
        MultiLabelTarget(0)(torch.rand(2, 3, 4))
    assert str(error.value) == "a multi-label output is (N, labels), got shape (2, 3, 4)"
    with pytest.raises(CamlensError, match=r"^the label is an integer index >= 0, got -1$"):
        MultiLabelTarget(-1)
    with pytest.raises(CamlensError) as error:
        RegressionTarget(2)(torch.rand(2, 2))
    assert str(error.value) == ("output 2 of an output of shape (2, 2): the model's output has 2 outputs "
                                "(valid: 0 to 1; pick another output with output=)")
    with pytest.raises(CamlensError, match=r"^the output index is an integer index >= 0, got 'a'$"):
        RegressionTarget("a")
    assert torch.equal(RegressionTarget(1)(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), torch.tensor([2.0, 4.0]))


def test_a_similarity_is_the_cosine_in_the_outputs_precision():
    output = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(0))
    reference = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = SimilarityTarget(reference).score(output, rows(2, 0, 1))
    expected = []
    for b, r in ((0, 2), (1, 0), (2, 1)):
        e, f = output[b].flatten().double(), reference[r]
        expected.append(float(e @ f / (e.norm() * f.norm())))
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    with pytest.raises(CamlensError) as error:
        SimilarityTarget(torch.ones(2, 2, 2))
    assert str(error.value) == ("a reference embedding is a float tensor (D,) or (N, D), got a tensor of shape "
                                "(2, 2, 2) of torch.float32")


# -- target functions ------------------------------------------------------------------------------------

def test_target_functions_per_image_get_their_own_rows():
    """Per-image target lists, one a ScoreTarget with data per image: each row is scored with its
    image's data (rows passed on), checked against cosines by hand."""
    model = Conv().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    reference = torch.rand(2, 3, generator=torch.Generator().manual_seed(3))
    similar = SimilarityTarget(reference)
    expl = camlens.GradCAM(model, "conv")(x, [[similar], [similar]])
    output = model(x).detach()
    expected = F.cosine_similarity(output, reference, dim=1)
    assert torch.allclose(expl.scores[:, 0], expected, atol=1e-6)


def failing(output):
    raise ValueError("no")


def test_a_failing_target_is_named_by_its_function_name():
    def inner(output):
        raise ValueError("no")

    model, x = Conv().eval(), torch.rand(1, 3, 4, 4)
    cases = [(failing, "failing"), (inner, "test_a_failing_target_is_named_by_its_function_name.inner"),
             (functools.partial(failing), repr(functools.partial(failing)))]
    for target, name in cases:
        with pytest.raises(CamlensError) as error:
            camlens.GradCAM(model, "conv")(x, target)
        assert str(error.value) == f"the target {name} failed on the model's output of shape (1, 3): ValueError: no"
    with pytest.raises(CamlensError) as error:
        camlens.GradCAM(model, "conv")(x, lambda output: output.argmax(dim=1))
    assert str(error.value).startswith("the target test_a_failing_target_is_named_by_its_function_name.<lambda> returned a "
                                       "tensor of shape (1,) of torch.int64 for an output of shape (1, 3): a target function returns one float score per row")


def test_score_targets_name_themselves_in_messages():
    from camlens.methods.meta import _Following

    segmentation = SemanticSegmentationTarget(2, torch.ones(3, 4, 5))
    assert repr(segmentation) == "SemanticSegmentationTarget(category=2, mask of shape (3, 4, 5))"
    assert repr(SimilarityTarget(torch.ones(7))) == "SimilarityTarget(reference of shape (7,))"
    assert repr(MultiLabelTarget(4, score="exp")) == "MultiLabelTarget(label=4, score='exp')"
    assert repr(RegressionTarget()) == "RegressionTarget(index=None)"
    assert repr(_Following(segmentation, 3, [False, True], False)) == repr(segmentation)  # as the user gave it


def test_class_and_function_targets_must_fit_the_images():
    model, x = Conv().eval(), torch.rand(3, 3, 4, 4)
    five = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 5)).eval()
    assert camlens.GradCAM(five, "0")(x, camlens.TopK(5)).targets.shape == (3, 5)  # k = every class
    for targets in ([[1], [2]], torch.zeros(3, 0, dtype=torch.long)):
        with pytest.raises(CamlensError) as error:
            camlens.GradCAM(model, "conv")(x, targets)
        assert str(error.value).startswith(f"class targets of shape {tuple(torch.as_tensor(targets).shape)} do not "
                                           "fit 3 image(s)") or "targets are empty" in str(error.value)
    first = lambda out: out[:, 0]  # noqa: E731
    with pytest.raises(CamlensError, match=r"^give every image the same number of target functions \(at least "
                                           r"one\)$"):
        camlens.GradCAM(model, "conv")(x, [[first, first], [first], [first]])
    assert camlens.GradCAM(model, "conv")(x[:1], [[first]]).scores.shape == (1, 1)  # one image, one list
    with pytest.raises(CamlensError) as error:
        camlens.GradCAM(nn.Sequential(nn.Conv2d(3, 2, 1)), "0")(x, 1)
    assert str(error.value).startswith("class targets need class scores (N, classes), but the model's output is a "
                                       "tensor of shape (3, 2, 4, 4): ")
