"""AugmentSmooth with targets that hold data per image: a segmentation mask moves with each
flipped or resized copy, a reference embedding and a list of functions per image follow their
image. Checked against the mean of plain Grad-CAM calls on copies made by hand (the images and
masks flipped and resized here, not by camlens), mapped back by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import camlens
from camlens import CamlensError, SemanticSegmentationTarget, SimilarityTarget
from camlens.methods import METHODS
from camlens.methods.meta import AugmentSmooth
from helpers import Head, Segmenter, build

LAYER = "features"


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, antialiased: as pytorch-grad-cam's ttach and camlens resize copies and maps."""
    flat = x.reshape(-1, 1, *x.shape[-2:]) if x.dim() == 3 else x
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*x.shape[:-2], *size)


def gradcam(model, x, target, method="gradcam"):
    return METHODS[method](model, LAYER)(x, target).maps[:, 0]


def test_segmentation_mask_is_flipped_with_each_copy(images):
    """HiResCAM (gradient times activation, position by position): where the mask lies shows in
    the map (Grad-CAM's channel means would not see a mask moved on this 1x1 classifier)."""
    model = build(Segmenter)
    torch.manual_seed(2)
    masks = torch.rand(3, 6, 6) > 0.5  # one per image, not symmetric

    def hires(x, m):
        return gradcam(model, x, SemanticSegmentationTarget(1, m), "hirescam")

    got = AugmentSmooth(METHODS["hirescam"](model, LAYER), flip=True, factors=(1.0, 1.1))(
        images, SemanticSegmentationTarget(1, masks)).maps[:, 0]
    mirrored = hires(images.flip(-1), masks.flip(-1)).flip(-1)
    expected = (hires(images, masks) + mirrored + hires(images * 1.1, masks)
                + hires(images.flip(-1) * 1.1, masks.flip(-1)).flip(-1)) / 4
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the mask left unflipped gives another map: the check can fail
    assert (hires(images.flip(-1), masks).flip(-1) - mirrored).abs().max() > 1e-2


@pytest.mark.parametrize("weights", [False, True], ids=["boolean", "weights"])
def test_segmentation_mask_is_resized_with_each_resized_copy(images, weights):
    model = build(Segmenter)
    torch.manual_seed(3)
    mask = torch.rand(6, 6, dtype=torch.float64) if weights else torch.rand(6, 6) > 0.5  # one for all images
    got = AugmentSmooth(METHODS["hirescam"](model, LAYER), flip=False, scales=(1.0, 2.0), factors=(1.0,))(
        images, SemanticSegmentationTarget(2, mask)).maps[:, 0]
    # at 24 x 24 the output is 12 x 12: each mask cell covers 2 x 2 output cells (nearest), or the
    # weights are interpolated bilinearly
    if weights:
        big_mask = F.interpolate(mask[None, None], size=(12, 12), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    else:
        big_mask = mask.repeat_interleave(2, 0).repeat_interleave(2, 1)
    big = gradcam(model, resize(images, (24, 24)), SemanticSegmentationTarget(2, big_mask), "hirescam")
    expected = (gradcam(model, images, SemanticSegmentationTarget(2, mask), "hirescam") + resize(big, (12, 12))) / 2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # a mask resized otherwise (shifted by one cell) gives another map: the check can fail
    other = gradcam(model, resize(images, (24, 24)), SemanticSegmentationTarget(2, big_mask.roll(1, 1)), "hirescam")
    assert (resize(other, (12, 12)) - resize(big, (12, 12))).abs().max() > 1e-2


def test_reference_embeddings_follow_their_image(images):
    model = build(Head, 5)
    torch.manual_seed(4)
    references = torch.randn(3, 5, dtype=torch.float64)  # one per image
    got = AugmentSmooth(camlens.GradCAM(model, LAYER), flip=True, factors=(1.0,))(
        images, SimilarityTarget(references)).maps[:, 0]
    expected = (gradcam(model, images, SimilarityTarget(references))
                + gradcam(model, images.flip(-1), SimilarityTarget(references)).flip(-1)) / 2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_list_of_functions_per_image_is_repeated_for_each_copy(images):
    model = build(Head, 4)
    functions = [lambda out: out[:, 0], lambda out: out[:, 3] - out[:, 1], lambda out: out[:, 2]]
    got = AugmentSmooth(camlens.GradCAM(model, LAYER), flip=True, factors=(0.9, 1.0))(images, functions).maps[:, 0]
    copies = [(False, 1.0), (True, 1.0), (False, 0.9), (True, 0.9)]
    expected = sum(
        (gradcam(model, (images.flip(-1) if f else images) * k, functions).flip(-1) if f
         else gradcam(model, images * k, functions))
        for f, k in copies
    ) / len(copies)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_mask_for_other_images_is_still_refused_in_one_line(images):
    model = build(Segmenter)
    with pytest.raises(CamlensError, match=r"holds 4 entries for 3 image\(s\)") as error:
        AugmentSmooth(camlens.GradCAM(model, LAYER))(images, SemanticSegmentationTarget(1, torch.ones(4, 6, 6)))
    assert "\n" not in str(error.value)


def test_a_shrunk_copys_mask(images):
    """At scale 0.5 (output 3 x 3): weights are averaged as the pixels are (antialiased), and a
    left-right symmetric boolean mask stays symmetric (nearest cell centre, no half-cell shift)."""
    model = build(Segmenter)
    torch.manual_seed(6)
    weights = torch.rand(6, 6, dtype=torch.float64)
    got = AugmentSmooth(METHODS["hirescam"](model, LAYER), flip=False, scales=(1.0, 0.5), factors=(1.0,))(
        images, SemanticSegmentationTarget(2, weights)).maps[:, 0]
    small_mask = F.interpolate(weights[None, None], size=(3, 3), mode="bilinear", align_corners=False,
                               antialias=True)[0, 0]
    small = gradcam(model, resize(images, (6, 6)), SemanticSegmentationTarget(2, small_mask), "hirescam")
    expected = (gradcam(model, images, SemanticSegmentationTarget(2, weights), "hirescam") + resize(small, (12, 12))) / 2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)

    from camlens.methods.meta import _Following

    half = torch.zeros(6, 6, dtype=torch.bool)
    half[:, 1:5] = True  # symmetric left-right
    follow = _Following(SemanticSegmentationTarget(0, half), 1, [False], True)
    output = torch.zeros(1, 4, 7, 7, dtype=torch.float64, requires_grad=True)  # a copy at 7/6 of the size
    follow.score(output, torch.tensor([0])).backward()
    moved = output.grad[0, 0]  # the mask the copy's score used
    assert torch.equal(moved, moved.flip(-1)) and moved.sum() > 0
