"""Regression tests for faults found in a review of AugmentSmooth's targets with data per image
(822c2e3) and the sanity report's coinciding lines (7cda03e)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from camlens import SemanticSegmentationTarget
from camlens.methods import METHODS
from camlens.methods.meta import AugmentSmooth
from camlens.report.sanity import _chart


class Mirror(nn.Module):
    """A segmenter that commutes with left-right flips (kernels symmetric left-right, stride 1):
    output (N, 4, H, W) at the input's resolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            weight = self.features[0].weight
            weight.copy_((weight + weight.flip(-1)) / 2)

    def forward(self, x):
        return self.classifier(self.features(x))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def test_a_flipped_resized_copys_mask_is_the_mirror_of_the_unflipped_copys():
    """A copy is resized, then flipped; its boolean mask must be too. Flipped before a nearest
    resize (12 -> 13 cells), the mask of the flipped copy covered other cells than the mirror of
    the unflipped copy's, and on a model that commutes with flips the flipped copies changed the
    mean (by 0.08)."""
    model = Mirror().double().eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[:, :5] = True
    assert (model(x.flip(-1)) - model(x).flip(-1)).abs().max() < 1e-12
    method = METHODS["hirescam"](model, "features")

    def smooth(flip):
        return AugmentSmooth(method, flip=flip, scales=(1.0, 1.1), factors=(1.0,))(
            x, SemanticSegmentationTarget(1, mask)).maps[:, 0]

    got = smooth(True)
    torch.testing.assert_close(got, smooth(False), rtol=0, atol=1e-9)

    # by hand: the copies resized to 13 x 13 (the output too), the mask resized (nearest cell centre) then flipped
    def hires(images, m):
        return method(images, SemanticSegmentationTarget(1, m)).maps[:, 0]

    big = resize(x, (13, 13))
    big_mask = F.interpolate(mask[None, None].double(), size=(13, 13), mode="nearest-exact")[0, 0] > 0.5
    expected = (hires(x, mask) + hires(x.flip(-1), mask.flip(-1)).flip(-1)
                + resize(hires(big, big_mask)[:, None], (12, 12))[:, 0]
                + resize(hires(big.flip(-1), big_mask.flip(-1)).flip(-1)[:, None], (12, 12))[:, 0]) / 4
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the mask not flipped with the copy is another mask: the check can fail
    assert not torch.equal(big_mask, big_mask.flip(-1))


def test_methods_blank_at_every_step_are_not_said_to_coincide():
    """Two methods whose maps are blank at every step have no similarity line (only the trained
    model's point, which every method shares): the caption named them as coinciding."""
    methods = [{"name": n, "display": n.upper(), "spearman": s}
               for n, s in (("a", [None, None]), ("b", [None, None]), ("c", [0.5, None]), ("d", [0.5004, None]),
                            ("e", [0.7, 0.1]))]
    chart = _chart(methods, "spearman", ["trained", "s1", "s2"], -1.0, 1.0)
    assert chart["together"] == ["C = D"]
    assert len(chart["lines"]) == 5
