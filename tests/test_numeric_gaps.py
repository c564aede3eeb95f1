"""Issue 30, item 1: the gaps mutation testing found, each closed by a test that computes the
expected number independently (NumPy or plain Python), on asymmetric and multi-batch cases."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.metrics.faithfulness import deletion_curve, gaussian_blur, insertion_curve
from camlens.metrics.localisation import (
    box_iou,
    energy_pointing_game,
    localisation_boxes,
    localisation_correct,
    pointing_game,
)

# -- the insertion metric's blur ---------------------------------------------------------------------

def blur_reference(image: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """exp(-(i - r)^2 / 2 sigma^2), normalised; edges padded by repeating them; rows, then columns."""
    radius = kernel_size // 2
    kernel = np.array([np.exp(-((i - radius) ** 2) / (2 * sigma**2)) for i in range(kernel_size)])
    kernel /= kernel.sum()
    padded = np.pad(image, radius, mode="edge")
    height, width = image.shape
    rows = np.array([[sum(kernel[k] * padded[y, x + k] for k in range(kernel_size)) for x in range(width)]
                     for y in range(height + 2 * radius)])
    return np.array([[sum(kernel[k] * rows[y + k, x] for k in range(kernel_size)) for x in range(width)]
                     for y in range(height)])


@pytest.mark.parametrize("where", ["constant", "centre", "border", "asymmetric"])
@pytest.mark.parametrize("kernel_size, sigma", [(5, 1.3), (11, 5.0)])
def test_the_blur_is_a_separable_gaussian_with_edges_repeated(where, kernel_size, sigma):
    image = np.zeros((9, 13))
    if where == "constant":
        image[:] = 0.7
    elif where == "centre":
        image[4, 6] = 1.0
    elif where == "border":
        image[0, 12] = 1.0  # a corner: the repeated edge weighs in
    else:
        image = np.random.default_rng(0).random((9, 13))
    got = gaussian_blur(torch.tensor(image)[None, None].repeat(1, 2, 1, 1), kernel_size, sigma)
    expected = blur_reference(image, kernel_size, sigma)
    for channel in range(2):
        np.testing.assert_allclose(got[0, channel].numpy(), expected, rtol=1e-12, atol=1e-14)


def test_the_blurs_defaults_are_the_papers_kernel_11_and_sigma_5():
    image = np.random.default_rng(1).random((12, 12))
    got = gaussian_blur(torch.tensor(image)[None, None])
    np.testing.assert_allclose(got[0, 0].numpy(), blur_reference(image, 11, 5.0), rtol=1e-12, atol=1e-14)


# -- deletion and insertion over several batches ---------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).double().eval()


@pytest.mark.parametrize("curve", [deletion_curve, insertion_curve])
def test_curves_in_any_batch_size_equal_one_batch(curve):
    model = small_model()
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 6, 7, generator=generator, dtype=torch.float64)
    maps = torch.rand(3, 6, 7, generator=generator, dtype=torch.float64)
    classes = torch.tensor([0, 2, 1])
    whole = curve(model, images, maps, classes, steps=5, batch_size=1000)
    assert whole.shape == (3, 6)
    for batch_size in (1, 2, 5):
        # The same rows, batched otherwise: equal up to the convolution's rounding, which on some
        # CPUs depends on the batch's size (one ulp of float64 seen); a row out of place is far off.
        batched = curve(model, images, maps, classes, steps=5, batch_size=batch_size)
        assert torch.allclose(batched, whole, rtol=0, atol=1e-14), batch_size


def test_a_deletion_curve_by_hand():
    """Step s shows the baseline on the round(s * HW / steps) most salient pixels (ties by index)."""
    model = small_model()
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    maps = torch.rand(2, 4, 5, generator=generator, dtype=torch.float64)
    classes = torch.tensor([1, 0])
    got = deletion_curve(model, images, maps, classes, steps=4, baseline=0.25, batch_size=3)
    for n in range(2):
        order = sorted(range(20), key=lambda i: (-float(maps[n].flatten()[i]), i))
        for step in range(5):
            image = images[n].clone().reshape(3, 20)
            image[:, order[: round(step * 20 / 4)]] = 0.25
            with torch.no_grad():
                expected = model(image.reshape(1, 3, 4, 5)).softmax(dim=1)[0, classes[n]]
            assert float(got[n, step]) == pytest.approx(float(expected), abs=1e-12)


# -- localisation, against plain Python ------------------------------------------------------------------

def iou_by_hand(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def random_box(rng):
    x0, y0 = rng.uniform(0, 20), rng.uniform(0, 30)
    return [x0, y0, x0 + rng.uniform(0, 15), y0 + rng.uniform(0, 8)]  # never square, x and y apart


def test_box_iou_on_asymmetric_boxes_and_empty_ones():
    rng = random.Random(4)
    first = [random_box(rng) for _ in range(200)]
    second = [random_box(rng) for _ in range(200)]
    got = box_iou(torch.tensor(first, dtype=torch.float64), torch.tensor(second, dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), [iou_by_hand(a, b) for a, b in zip(first, second)], rtol=1e-12, atol=0)
    empty = torch.tensor([[3.0, 4.0, 3.0, 9.0]], dtype=torch.float64)
    assert float(box_iou(empty, empty)) == 0.0  # two empty boxes: 0, not 1
    assert float(box_iou(torch.tensor([[0.0, 0, 4, 2]]), torch.tensor([[0.0, 0, 2, 4]]))) == pytest.approx(4 / 12)


def peaked_maps(count=6, height=9, width=14, seed=5):
    """Maps whose peaks sit at different heights and widths, one per image."""
    rng = np.random.default_rng(seed)
    maps = rng.random((count, height, width)) * 0.5
    for n in range(count):
        maps[n, (2 * n + 1) % height, (5 * n + 3) % width] = 1.0
    return maps


def test_pointing_game_by_hand_with_tolerances_0_and_2():
    maps = peaked_maps()
    rng = random.Random(6)
    boxes = [[[b * 0.5 for b in random_box(rng)]] for _ in range(len(maps))]
    for tolerance in (0.0, 2.0):
        expected = []
        for n, image_boxes in enumerate(boxes):
            index = int(np.argmax(maps[n]))  # the first maximum, row-major
            y, x = index // maps.shape[2] + 0.5, index % maps.shape[2] + 0.5
            hit = any(np.hypot(max(x0 - x, 0, x - x1), max(y0 - y, 0, y - y1)) <= tolerance
                      for x0, y0, x1, y1 in image_boxes)
            expected.append(float(hit))
        got = pointing_game(torch.tensor(maps), boxes, tolerance=tolerance)
        assert got.tolist() == expected, tolerance
    inside = [[[3.0, 1.0, 4.0, 2.0]]]  # the peak's pixel (3, 1) exactly: a hit at tolerance 0
    peak = np.zeros((1, 9, 14))
    peak[0, 1, 3] = 1.0
    assert pointing_game(torch.tensor(peak), inside, tolerance=0.0).tolist() == [1.0]
    assert pointing_game(torch.tensor(peak), [[[5.0, 1.0, 6.0, 2.0]]], tolerance=0.0).tolist() == [0.0]


def test_energy_pointing_game_when_the_maps_total_is_below_one():
    rng = np.random.default_rng(7)
    maps = rng.random((4, 5, 6)) * 0.01  # totals well below 1
    masks = rng.random((4, 5, 6)) > 0.6
    got = energy_pointing_game(torch.tensor(maps), torch.tensor(masks))
    expected = [(maps[n] * masks[n]).sum() / maps[n].sum() for n in range(4)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    zero = energy_pointing_game(torch.zeros(1, 5, 6, dtype=torch.float64), torch.tensor(masks[:1]))
    assert zero.tolist() == [0.0]


def components_by_hand(mask):
    """8-connected components of a 2-D bool array, by flood fill: lists of (row, col)."""
    seen, found = set(), []
    for start in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
        if not mask[start] or start in seen:
            continue
        stack, component = [start], []
        seen.add(start)
        while stack:
            r, c = stack.pop()
            component.append((r, c))
            for dr, dc in itertools.product((-1, 0, 1), repeat=2):
                near = (r + dr, c + dc)
                if (0 <= near[0] < mask.shape[0] and 0 <= near[1] < mask.shape[1] and mask[near]
                        and near not in seen):
                    seen.add(near)
                    stack.append(near)
        found.append(component)
    return found


def box_by_hand(saliency, threshold):
    peak = saliency.max()
    if peak <= 0:
        return [0.0, 0.0, 0.0, 0.0]
    components = components_by_hand(saliency >= threshold * peak)
    # The largest; of equal ones, the one whose first pixel (row-major) comes first.
    best = max(components, key=lambda comp: (len(comp), [-(r * saliency.shape[1] + c) for r, c in [min(comp)]]))
    rows, cols = [r for r, _ in best], [c for _, c in best]
    return [min(cols), min(rows), max(cols) + 1.0, max(rows) + 1.0]


@pytest.mark.parametrize("threshold", [0.2, 0.6])
def test_localisation_boxes_per_image_by_hand(threshold):
    maps = peaked_maps(seed=8)
    maps[2] *= 5  # the peaks differ between images: each image is thresholded at its own
    maps[3] = 0.0  # an all-zero map: an empty box, not the whole image
    got = localisation_boxes(torch.tensor(maps), threshold)
    assert got.tolist() == [box_by_hand(maps[n], threshold) for n in range(len(maps))]


def test_localisation_correct_uses_its_threshold_and_the_best_box():
    maps = peaked_maps(seed=9)
    rng = random.Random(10)
    truth = [[[b * 0.6 for b in random_box(rng)], [b * 0.6 for b in random_box(rng)]] for _ in range(len(maps))]
    for threshold, bar in ((0.2, 0.5), (0.6, 0.1)):
        best, correct = localisation_correct(torch.tensor(maps), truth, threshold=threshold, iou=bar)
        expected = [max(iou_by_hand(box_by_hand(maps[n], threshold), t) for t in truth[n]) for n in range(len(maps))]
        np.testing.assert_allclose(best.numpy(), expected, rtol=1e-12)
        assert correct.tolist() == [float(value >= bar) for value in expected]


# -- what a run records ----------------------------------------------------------------------------------

def test_the_recorded_options_are_exactly_these():
    """Resume relies on these records: a renamed key, or Score-CAM's baseline recorded as None."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    assert camlens.SmoothGradCAMPlusPlus(model, "1").options() == {
        "n_samples": 8, "noise_level": 0.15, "seed": None, "batch_size": 8}
    assert camlens.SmoothGradCAMPlusPlus(model, "1", n_samples=3, noise_level=0.2, seed=7, batch_size=2).options() \
        == {"n_samples": 3, "noise_level": 0.2, "seed": 7, "batch_size": 2}
    assert camlens.ScoreCAM(model, "1").options() == {
        "score": "probability", "baseline": None, "channel_softmax": False, "batch_size": 16}
    assert camlens.ScoreCAM(model, "1", score="logit", baseline="zeros", channel_softmax=True, batch_size=4,
                            top_channels=2).options() == {
        "score": "logit", "baseline": "zeros", "channel_softmax": True, "batch_size": 4, "top_channels": 2}
    assert camlens.ScoreCAM(model, "1", baseline=torch.zeros(1, 3, 8, 8)).options()["baseline"] == "tensor"


# -- combine: per-activation weights, and maps flat to float rounding -------------------------------

def test_a_channel_sum_with_a_weight_per_activation_by_hand():
    from camlens.combine import channel_sum, weighted_sum

    generator = torch.Generator().manual_seed(11)
    weights = torch.randn(2, 3, 4, 5, 6, generator=generator, dtype=torch.float64)  # (N, T, K, h, w)
    activations = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64)
    expected = torch.zeros(2, 3, 5, 6, dtype=torch.float64)
    for n, t, k in itertools.product(range(2), range(3), range(4)):
        expected[n, t] += weights[n, t, k] * activations[n, k]
    torch.testing.assert_close(channel_sum(weights, activations), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weighted_sum(weights, activations), expected.clamp(min=0), rtol=1e-12, atol=1e-12)


def test_a_map_that_differs_by_rounding_alone_normalises_to_zero_and_a_real_spread_does_not():
    from camlens.combine import is_constant, normalise

    base = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float32)
    noisy = base.clone()
    noisy[0, 0, 1, 2] = torch.nextafter(torch.tensor(0.3), torch.tensor(1.0))  # one ulp apart
    assert bool(is_constant(noisy).all())
    assert torch.equal(normalise(noisy), torch.zeros_like(noisy))  # not noise stretched to [0, 1]
    spread = base.clone()
    spread[0, 0, 1, 2] = 0.31
    assert float(normalise(spread)[0, 0, 1, 2]) == 1.0 and float(normalise(spread).sum()) == 1.0


def test_normalise_keeps_a_spread_of_exactly_one_and_zeroes_what_it_is_told_is_constant():
    from camlens.combine import normalise

    ramp = torch.linspace(0, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)  # min 0, max 1: span exactly 1
    assert torch.equal(normalise(ramp), ramp)
    told = normalise(ramp, constant=torch.tensor([[True]]))
    assert torch.equal(told, torch.zeros_like(ramp))


def test_flat_is_at_most_64_epsilons_of_the_magnitude():
    from camlens.combine import normalise

    eps = torch.finfo(torch.float32).eps
    edge = torch.full((1, 1, 2, 2), 1.0)
    edge[0, 0, 0, 0] = 1.0 - 64 * eps  # a spread of exactly 64 epsilons of 1.0: flat, "at most"
    assert float(edge.max() - edge.min()) == 64 * eps
    assert torch.equal(normalise(edge), torch.zeros_like(edge))
    large = torch.full((1, 1, 2, 2), 100.0)
    large[0, 0, 1, 1] = torch.nextafter(torch.nextafter(torch.tensor(100.0), torch.tensor(200.0)), torch.tensor(200.0))
    assert torch.equal(normalise(large), torch.zeros_like(large))  # 2 ulps at 100: relative to the magnitude


# -- the smaller gaps: checks and defaults pinned ----------------------------------------------------

def test_the_metrics_refuse_what_would_give_a_wrong_number():
    from camlens.metrics.faithfulness import drop_and_increase

    model = small_model()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps = torch.rand(2, 8, 8, dtype=torch.float64)
    cases = [
        (lambda: deletion_curve(model, images[0], maps[0], torch.tensor([0])),
         r"images must be a non-empty float tensor \(N, C, H, W\), got \(3, 8, 8\)"),
        (lambda: deletion_curve(model, images, maps, torch.tensor([0, 1, 2])),
         r"classes must be 2 integer class indices, one per image, got torch.int64 of shape \(3,\)"),
        (lambda: drop_and_increase(model, images, maps, torch.tensor([0])),
         r"classes must be 2 integer class indices, one per image"),
        (lambda: gaussian_blur(images, 11.0), r"the blur's kernel_size must be a positive odd integer, got 11.0"),
        (lambda: gaussian_blur(images, 4), r"the blur's kernel_size must be a positive odd integer, got 4"),
        (lambda: gaussian_blur(images, 5, float("inf")), r"the blur's sigma must be a finite number > 0"),
        (lambda: deletion_curve(model, images, maps, torch.tensor([0, 1]), baseline=float("nan")),
         r"the deletion baseline must be a finite number, got nan"),
    ]
    for call, message in cases:
        with pytest.raises(camlens.CamlensError, match=message):
            call()


def test_the_curves_default_to_16_steps():
    model = small_model()
    images = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    maps = torch.rand(1, 8, 8, dtype=torch.float64)
    assert deletion_curve(model, images, maps, torch.tensor([0])).shape == (1, 17)
    assert insertion_curve(model, images, maps, torch.tensor([0])).shape == (1, 17)


def test_targets_and_seeds_are_checked():
    model = small_model()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(camlens.CamlensError, match=r"seed must be an integer that fits in 64 bits"):
        camlens.SmoothGradCAMPlusPlus(model, "1", seed=2**64)
    with pytest.raises(camlens.CamlensError, match=r"unknown score 'nonsense': choose one of"):
        camlens.TopK(2, score="nonsense")
    with pytest.raises(camlens.CamlensError, match=r"top-k needs a positive integer k, got 0"):
        camlens.TopK(0)
    for index in (3, -1):  # one past the last class, and a negative one: the project's error, not IndexError
        with pytest.raises(camlens.CamlensError, match=rf"class {index} is out of range: the model has 3 classes"):
            camlens.explain(model, images, "gradcam", "1", targets=index)
    # A target function may give (B, 1) as well as (B,): the same maps.
    column = camlens.explain(model, images, "gradcam", "1", targets=lambda output: output[:, 1:2])
    flat = camlens.explain(model, images, "gradcam", "1", targets=lambda output: output[:, 1])
    assert torch.equal(column.maps, flat.maps) and torch.equal(column.scores, flat.scores)


# -- localisation: what mutation testing of metrics/localisation.py left ---------------------------------

def test_localisation_refuses_maps_and_boxes_of_the_wrong_kind():
    from camlens.metrics.localisation import box_mask

    flat = torch.rand(4, 5)
    for call, message in [
        (lambda: localisation_boxes(flat), r"maps must have shape \(N, H, W\), e\.g\. explanation\.maps\[:, t\], "
                                           r"got \(4, 5\)$"),
        (lambda: localisation_boxes(torch.zeros(0, 4, 5)), r"maps must have shape \(N, H, W\).*got \(0, 4, 5\)$"),
        (lambda: localisation_boxes([[1.0]]), r"maps must have shape \(N, H, W\).*got list$"),
        (lambda: pointing_game(torch.rand(2, 4, 5), [[[0, 0, 1, 1]]]),
         r"boxes must be a list of 2 lists of boxes, one list per image"),
        (lambda: box_mask([[0, 0, 1]], 4, 5), r"a box is four finite numbers \(x_min, y_min, x_max, y_max\), got \[0, 0, 1\]"),
        (lambda: box_mask([[0, 0, 1, float("nan")]], 4, 5), r"a box is four finite numbers .*, got \[0, 0, 1, nan\]"),
        (lambda: energy_pointing_game(torch.rand(2, 4, 5), torch.ones(2, 4, 4, dtype=torch.bool)),
         r"masks must have the maps' shape \(2, 4, 5\), got \(2, 4, 4\)"),
        (lambda: energy_pointing_game(torch.rand(2, 4, 5), [[True]]), r"masks must have the maps' shape \(2, 4, 5\), got list"),
        (lambda: box_mask(5, 4, 5), r"a box is four finite numbers \(x_min, y_min, x_max, y_max\), got 5$"),
        (lambda: box_mask([["a", "b", "c", "d"]], 4, 5), r"a box is four finite numbers .*, got \['a', 'b', 'c', 'd'\]"),
    ]:
        with pytest.raises(camlens.CamlensError, match=message):
            call()


def test_box_mask_takes_the_pixels_whose_centre_lies_in_a_box_edges_included():
    from camlens.metrics.localisation import box_mask

    rng = random.Random(12)
    boxes = [[rng.randint(0, 8) + rng.choice([0.0, 0.5]), rng.randint(0, 5) + rng.choice([0.0, 0.5]), 0, 0]
             for _ in range(3)]
    for box in boxes:  # edges on pixel centres (k + 0.5) too: those pixels are in
        box[2], box[3] = box[0] + rng.randint(0, 4) + 0.5, box[1] + rng.randint(0, 3) + 0.5
    got = box_mask(boxes, 7, 11)
    expected = [[any(x0 <= c + 0.5 <= x1 and y0 <= r + 0.5 <= y1 for x0, y0, x1, y1 in boxes) for c in range(11)]
                for r in range(7)]
    assert got.tolist() == expected


def test_the_pointing_game_row_is_the_whole_row_not_a_fraction():
    peak = np.zeros((1, 6, 14))
    peak[0, 2, 12] = 1.0  # column 12 of 14: a fractional row would move the point past the box
    assert pointing_game(torch.tensor(peak), [[[12.0, 2.0, 13.0, 3.0]]], tolerance=0.0).tolist() == [1.0]
    assert pointing_game(torch.tensor(peak), [[[12.0, 3.0, 13.0, 4.0]]], tolerance=0.0).tolist() == [0.0]


def test_a_pixel_at_exactly_the_threshold_is_in_the_box():
    saliency = np.zeros((1, 5, 8))
    saliency[0, 1, 1] = 1.0
    saliency[0, 1, 2:6] = 0.25  # exactly 0.25 x the peak
    assert localisation_boxes(torch.tensor(saliency), 0.25).tolist() == [[1.0, 1.0, 6.0, 2.0]]


def test_iou_of_boxes_smaller_than_a_pixel_and_a_hit_at_exactly_the_bar():
    small = torch.tensor([[0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    other = torch.tensor([[0.25, 0.0, 0.75, 0.5]], dtype=torch.float64)  # union 0.375, below 1
    assert float(box_iou(small, other)) == pytest.approx(iou_by_hand([0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5]))
    assert float(box_iou(small, other)) == pytest.approx(1 / 3)
    saliency = np.zeros((1, 5, 8))
    saliency[0, 1:3, 2:5] = 1.0
    best, correct = localisation_correct(torch.tensor(saliency), [[[2.0, 1.0, 5.0, 3.0]]], iou=1.0)
    assert best.tolist() == [1.0] and correct.tolist() == [1.0]  # IoU exactly at the bar counts


def test_a_box_edge_on_a_pixel_centre_takes_that_pixel_at_either_end():
    from camlens.metrics.localisation import box_mask

    mask = box_mask([[0.5, 0.5, 2.5, 1.5]], 3, 4)  # centres at 0.5 .. 2.5 across, 0.5 .. 1.5 down
    assert mask.tolist() == [[True, True, True, False], [True, True, True, False], [False, False, False, False]]


# -- faithfulness: what mutation testing of metrics/faithfulness.py left ------------------------------

def test_ties_in_a_map_are_broken_by_pixel_index():
    """A map with equal values (a coarse map upsampled, a blank region): the curve ranks them by index."""
    model = small_model()
    generator = torch.Generator().manual_seed(13)
    images = torch.rand(1, 3, 4, 5, generator=generator, dtype=torch.float64)
    maps = (torch.rand(1, 4, 5, generator=generator, dtype=torch.float64) * 3).floor() / 3  # 3 levels: ties
    got = deletion_curve(model, images, maps, torch.tensor([2]), steps=10, baseline=0.5)
    order = sorted(range(20), key=lambda i: (-float(maps[0].flatten()[i]), i))
    for step in range(11):
        image = images[0].clone().reshape(3, 20)
        image[:, order[: int(step * 20 / 10 + 0.5)]] = 0.5
        with torch.no_grad():
            expected = model(image.reshape(1, 3, 4, 5)).softmax(dim=1)[0, 2]
        assert float(got[0, step]) == pytest.approx(float(expected), abs=1e-12), step


def test_insertion_starts_from_the_papers_blur_and_given_probabilities_change_nothing():
    from camlens.metrics.faithfulness import class_probabilities, drop_and_increase

    model = small_model()
    generator = torch.Generator().manual_seed(14)
    images = torch.rand(2, 3, 12, 12, generator=generator, dtype=torch.float64)
    maps = torch.rand(2, 12, 12, generator=generator, dtype=torch.float64)
    classes = torch.tensor([1, 0])
    curve = insertion_curve(model, images, maps, classes, steps=3)
    blurred = torch.tensor(np.stack([[blur_reference(images[n, c].numpy(), 11, 5.0) for c in range(3)]
                                     for n in range(2)]))
    torch.testing.assert_close(curve[:, 0], class_probabilities(model, blurred, classes), rtol=1e-10, atol=1e-12)
    given = class_probabilities(model, images, classes)
    assert torch.equal(insertion_curve(model, images, maps, classes, steps=3, probability=given), curve)
    assert torch.equal(deletion_curve(model, images, maps, classes, steps=3, probability=given),
                       deletion_curve(model, images, maps, classes, steps=3))
    with_given = drop_and_increase(model, images, maps, classes, probability=given)
    without = drop_and_increase(model, images, maps, classes)
    assert all(torch.equal(with_given[key], without[key]) for key in without)


def test_explanation_images_weigh_every_channel_by_the_map():
    from camlens.metrics.faithfulness import explanation_images

    images = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    maps = torch.rand(2, 4, 5, dtype=torch.float64)
    expected = torch.stack([torch.stack([images[n, c] * maps[n] for c in range(3)]) for n in range(2)])
    assert torch.equal(explanation_images(images, maps), expected)


def test_the_blurs_and_the_areas_limits():
    from camlens.metrics.faithfulness import area_under_curve

    images = torch.rand(1, 2, 5, 6, dtype=torch.float64)
    assert torch.equal(gaussian_blur(images, 1, 3.0), images)  # a kernel of 1: the image itself
    np.testing.assert_allclose(gaussian_blur(images, 3, 0.4)[0, 0].numpy(), blur_reference(images[0, 0].numpy(), 3, 0.4),
                               rtol=1e-12)  # a sigma below 1 is a sigma
    for kernel_size, sigma in ((2, 1.0), (0, 1.0), (True, 1.0)):
        with pytest.raises(camlens.CamlensError, match="the blur's kernel_size must be a positive odd integer"):
            gaussian_blur(images, kernel_size, sigma)
    with pytest.raises(camlens.CamlensError, match=r"the blur's sigma must be a finite number > 0, got 0"):
        gaussian_blur(images, 3, 0)
    two = torch.tensor([[0.2, 0.6], [1.0, 0.0]], dtype=torch.float64)  # one step: the trapezoid
    assert area_under_curve(two).tolist() == pytest.approx([0.4, 0.5])
    for bad, got in ((torch.zeros(2, 1), r"\(2, 1\)"), (torch.zeros(3), r"\(3,\)"), ([[0.0, 1.0]], "list")):
        with pytest.raises(camlens.CamlensError, match=rf"curves must have shape \(N, steps \+ 1\) with steps >= 1, "
                                                        rf"got {got}$"):
            area_under_curve(bad)


def test_the_faithfulness_inputs_are_checked():
    model = small_model()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps = torch.rand(2, 8, 8, dtype=torch.float64)
    classes = torch.tensor([0, 1])
    for call, message in [
        (lambda: deletion_curve(model, torch.zeros(0, 3, 8, 8), maps[:0], classes[:0]),
         r"images must be a non-empty float tensor \(N, C, H, W\), got \(0, 3, 8, 8\)$"),
        (lambda: deletion_curve(model, images.long(), maps, classes),
         r"images must be a non-empty float tensor \(N, C, H, W\), got \(2, 3, 8, 8\)$"),
        (lambda: deletion_curve(model, images.tolist(), maps, classes), r"images must be .*, got list$"),
        (lambda: insertion_curve(model, images, maps[:, :4], classes),
         r"maps must have shape \(2, 8, 8\) \(one map per image, at input resolution, e\.g\. explanation\.maps\[:, t\]\), "
         r"got \(2, 4, 8\)$"),
        (lambda: insertion_curve(model, images, maps.tolist(), classes), r"maps must have shape \(2, 8, 8\) .*got list$"),
        (lambda: deletion_curve(model, images, maps, torch.tensor([0.0, 1.0])),
         r"classes must be 2 integer class indices, one per image, got torch.float32 of shape \(2,\)$"),
        (lambda: deletion_curve(model, images, maps, torch.tensor([True, False])),
         r"classes must be 2 integer .*, got torch.bool of shape \(2,\)$"),
        (lambda: deletion_curve(model, images, maps, classes, steps=0), r"steps must be"),
        (lambda: deletion_curve(model, images, maps, classes, batch_size=0), r"batch_size must be"),
    ]:
        with pytest.raises(camlens.CamlensError, match=message):
            call()


def test_given_probabilities_are_used_and_the_blur_follows_its_options():
    from camlens.metrics.faithfulness import (
        average_drop,
        class_probabilities,
        drop_and_increase,
    )

    model = small_model()
    generator = torch.Generator().manual_seed(15)
    images = torch.rand(2, 3, 9, 9, generator=generator, dtype=torch.float64)
    maps = torch.rand(2, 9, 9, generator=generator, dtype=torch.float64)
    classes = torch.tensor([2, 1])
    given = torch.tensor([0.9, 0.05], dtype=torch.float64)  # not the model's: the caller's Y is what is used
    result = drop_and_increase(model, images, maps, classes, probability=given)
    assert torch.equal(result["probability"], given)
    assert torch.equal(result["drop"], average_drop(given, result["explained_probability"]))
    curve = insertion_curve(model, images, maps, classes, steps=2, kernel_size=5, sigma=2.0)
    blurred = torch.tensor(np.stack([[blur_reference(images[n, c].numpy(), 5, 2.0) for c in range(3)]
                                     for n in range(2)]))
    torch.testing.assert_close(curve[:, 0], class_probabilities(model, blurred, classes), rtol=1e-10, atol=1e-12)
    with pytest.raises(camlens.CamlensError, match=r"classes must be 2 integer class indices, one per image, got str$"):
        deletion_curve(model, images, maps, "ab")


# -- metrics/sanity.py: the similarities and the cascade's groups -------------------------------------

def test_spearman_against_scipy_with_ties_and_oblong_maps():
    from scipy.stats import spearmanr

    from camlens.metrics.sanity import spearman

    rng = np.random.default_rng(4)
    first = rng.integers(0, 4, size=(3, 2, 3, 5)).astype(float)  # few values: many ties
    second = rng.random((3, 2, 3, 5))
    got = spearman(torch.tensor(first), torch.tensor(second))
    assert got.shape == (3, 2)
    for i, j in itertools.product(range(3), range(2)):
        expected = spearmanr(first[i, j].ravel(), second[i, j].ravel()).statistic
        assert got[i, j].item() == pytest.approx(expected, abs=1e-12)
    pair = spearman(torch.tensor([[[1.0, 2.0]], [[3.0, 3.0]]]), torch.tensor([[[5.0, 4.0]], [[1.0, 2.0]]]))
    assert pair[0].item() == pytest.approx(-1.0) and pair[1].isnan()  # two pixels; a constant map


def ssim_reference(x: np.ndarray, y: np.ndarray, window: int, sigma: float, data_range: float) -> float:
    """Wang et al. 2004 with a Gaussian window, at every position where the whole window fits."""
    size = min(window, *x.shape)
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * a).sum(), (w * b).sum()
            vx, vy = (w * a * a).sum() - mx**2, (w * b * b).sum() - my**2
            cov = (w * a * b).sum() - mx * my
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("shape, window, sigma, data_range", [
    ((12, 14), 11, 1.5, 1.0),  # the defaults
    ((4, 7), 11, 1.5, 1.0),  # a map smaller than the window: the window shrinks to 4
    ((7, 4), 11, 1.5, 1.0),
    ((9, 9), 5, 0.8, 2.0),
])
def test_ssim_against_a_plain_loop(shape, window, sigma, data_range):
    from camlens.metrics.sanity import ssim

    rng = np.random.default_rng(5)
    first, second = rng.random((2, *shape)), rng.random((2, *shape)) * data_range
    got = ssim(torch.tensor(first), torch.tensor(second), window=window, sigma=sigma, data_range=data_range)
    for n in range(2):
        assert got[n].item() == pytest.approx(ssim_reference(first[n], second[n], window, sigma, data_range),
                                              rel=1e-10)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gain = nn.Parameter(torch.ones(3))  # its own parameter, no reset_parameters

    def forward(self, x):
        return self.conv(x) * self.gain[:, None, None]


class Cascade(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = Block()  # a group of its own below the model: its conv is not a group apart
        self.body = nn.Sequential(Block(), nn.ReLU())
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = self.block(self.stem(self.stem(x)))  # stem runs twice: still one group, by when it last finished
        return self.fc(self.body(x).mean(dim=(2, 3)))


def test_the_cascades_groups_are_the_shallowest_owners_last_finished_first():
    from camlens.metrics.sanity import randomisation_groups

    assert randomisation_groups(Cascade(), torch.rand(1, 3, 4, 4)) == ["fc", "body.0", "block", "stem"]


def test_reinitialise_uses_each_modules_own_reset_else_a_small_normal():
    from camlens.metrics.sanity import reinitialise

    block = Block()
    expected = Block()
    torch.manual_seed(8)
    reinitialise(block)
    torch.manual_seed(8)  # by hand, in the order of modules(): the block's own gain, then its conv
    nn.init.normal_(expected.gain, std=0.02)
    expected.conv.reset_parameters()
    for got, want in zip(block.parameters(), expected.parameters()):
        assert torch.equal(got, want)


def test_average_ranks_against_scipy():
    from scipy.stats import rankdata

    from camlens.metrics.sanity import _average_ranks

    values = np.random.default_rng(6).integers(0, 5, size=(4, 9)).astype(float)
    got = _average_ranks(torch.tensor(values))
    np.testing.assert_array_equal(got.numpy(), rankdata(values, axis=1))


@pytest.mark.parametrize("spearman, options, expected", [
    ([0.9, 0.2], {}, ("LATE", 1, 0.5, 1)),  # similar at 1 of 2 steps: more than a quarter
    ([0.9, 0.2, 0.1, 0.0], {}, ("PASS", 1, 0.25, 1)),
    ([0.9, 0.6, 0.1, 0.0], {}, ("LATE", 2, 0.5, 2)),
    ([0.9, 0.1, 0.6], {}, ("FAIL", 2, 2 / 3, None)),
    ([0.4, float("nan"), None], {}, ("PASS", 0, 0.0, 0)),
    ([0.5, -1.0], {"threshold": 0.5}, ("LATE", 1, 0.5, 1)),  # at the threshold is similar
    ([-1.0, -1.0], {"threshold": -1}, ("FAIL", 2, 1.0, None)),
    ([0.99, 0.2], {"threshold": 1}, ("PASS", 0, 0.0, 0)),
    ([0.9, 0.2], {"max_similar": 1}, ("PASS", 1, 0.5, 1)),
    ([0.9, 0.2], {"max_similar": 0}, ("LATE", 1, 0.5, 1)),
])
def test_sanity_verdicts_by_hand(spearman, options, expected):
    from camlens.metrics.sanity import sanity_verdict

    got = sanity_verdict(spearman, **options)
    assert (got["verdict"], got["similar_steps"], got["similar_fraction"], got["changed_from"]) == expected


def test_sanity_verdicts_refuse_bounds_that_are_not_correlations_or_fractions():
    from camlens.errors import CamlensError
    from camlens.metrics.sanity import sanity_verdict

    with pytest.raises(CamlensError, match="^no randomisation steps to judge$"):
        sanity_verdict([])
    for threshold in (-1.01, 1.01, float("nan")):
        with pytest.raises(CamlensError, match="^threshold must be a Spearman correlation in"):
            sanity_verdict([0.5], threshold=threshold)
    for fraction in (-0.01, 1.01):
        with pytest.raises(CamlensError, match="^max_similar must be a fraction in"):
            sanity_verdict([0.5], max_similar=fraction)


def test_the_cascades_default_seed_is_0():
    from camlens.metrics.sanity import cascading_randomisation

    model = Cascade().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def explain(m):
        return m(x)[:, :, None, None].expand(2, 2, 2, 2)

    default = cascading_randomisation(explain, model, x)
    assert torch.equal(default["maps"], cascading_randomisation(explain, model, x, seed=0)["maps"])
    assert not torch.equal(default["maps"], cascading_randomisation(explain, model, x, seed=1)["maps"])


def test_the_cascade_randomises_the_groups_it_is_given():
    from camlens.metrics.sanity import cascading_randomisation

    model = Cascade().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def explain(m):
        seen.append([name for name, p in m.named_parameters() if not torch.equal(p, dict(model.named_parameters())[name])])
        return m(x)[:, :, None, None].expand(2, 2, 2, 2)

    result = cascading_randomisation(explain, model, x, groups=["block", "stem"])
    assert result["groups"] == ["block", "stem"] and result["steps"] == [["block"], ["stem"]]
    assert seen == [[], ["block.gain", "block.conv.weight", "block.conv.bias"],
                    ["stem.weight", "stem.bias", "block.gain", "block.conv.weight", "block.conv.bias"]]
