"""Quantus's complexity and mask-localisation metrics (issue 24): each against an independent
computation on small maps (the Gini mean difference, scipy's entropy, pairwise AUC, a plain sort),
and their invariants."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import entropy

import camlens
from camlens.errors import CamlensError
from camlens.metrics import (
    complexity,
    effective_complexity,
    mask_auc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparseness,
    top_k_intersection,
)
from camlens.models import efficientnet_lite0
from helpers import SAMPLES, run


def maps(*shape, seed=0, ties=False):
    values = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (values * 4).round() / 4 if ties else values


def test_sparseness_is_the_gini_index_by_its_mean_difference():
    """G = sum_ij |a_i - a_j| / (2 n sum a): the Gini index's definition by mean difference, which
    the sorted closed form computes; with Quantus's 1e-7 added to each value."""
    x = maps(3, 4, 5, ties=True)
    for row, value in zip(x.flatten(1), sparseness(x)):
        a = row.numpy() + 1e-7
        expected = np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size * a.sum())
        assert float(value) == pytest.approx(expected, abs=1e-12)
    one_hot = torch.zeros(1, 6, 6, dtype=torch.float64)
    one_hot[0, 2, 3] = 1.0
    assert float(sparseness(one_hot, eps=0)[0]) == pytest.approx(35 / 36, abs=1e-12)  # (n - 1) / n
    assert float(sparseness(torch.full((1, 6, 6), 0.3), eps=0)[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(sparseness(torch.zeros(1, 6, 6))[0]) == pytest.approx(0.0, abs=1e-12)  # defined by eps
    assert float(sparseness(torch.zeros(1, 6, 6), eps=0)[0]) == 0.0


def test_complexity_is_the_entropy_of_the_fractional_contributions():
    x = maps(3, 4, 5, seed=1)
    x[0, :2] = 0  # zeros contribute 0 ln 0 = 0
    for row, value in zip(x.flatten(1), complexity(x)):
        assert float(value) == pytest.approx(entropy(row.numpy()), abs=1e-12)
    one_hot = torch.zeros(1, 8)
    one_hot[0, 3] = 0.5
    assert float(complexity(one_hot)[0]) == 0.0
    assert float(complexity(torch.full((1, 8), 0.2))[0]) == pytest.approx(math.log(8), abs=1e-12)
    assert math.isnan(float(complexity(torch.zeros(1, 8))[0]))  # a blank map has no contributions


def test_effective_complexity_counts_the_positions_above_the_threshold():
    x = maps(2, 3, 4, 5, seed=2)
    x[x < 0.5] = 0
    assert effective_complexity(x).tolist() == [float((row > 1e-5).sum()) for row in x.flatten(1)]
    assert effective_complexity(x, eps=0.7).tolist() == [float((row > 0.7).sum()) for row in x.flatten(1)]


def rank_by_hand(row):
    """Positions from the highest value down, ties by position."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def test_mass_rank_and_top_k_against_a_plain_sort():
    x = maps(3, 6, 7, seed=3, ties=True)
    masks = maps(3, 6, 7, seed=4) > 0.6
    mass, rank, top = relevance_mass_accuracy(x, masks), relevance_rank_accuracy(x, masks), top_k_intersection(x, masks, 10)
    for n in range(3):
        a, s = x[n].flatten().tolist(), masks[n].flatten().tolist()
        assert float(mass[n]) == pytest.approx(sum(v for v, m in zip(a, s) if m) / sum(a), abs=1e-12)
        order = rank_by_hand(a)
        size = sum(s)
        assert float(rank[n]) == pytest.approx(sum(s[i] for i in order[:size]) / size, abs=1e-12)
        assert float(top[n]) == pytest.approx(sum(s[i] for i in order[:10]) / 10, abs=1e-12)
    blank = torch.zeros(1, 6, 7, dtype=torch.float64)
    assert math.isnan(float(relevance_mass_accuracy(blank, masks[:1])[0]))
    assert math.isnan(float(relevance_rank_accuracy(x[:1], torch.zeros_like(masks[:1]))[0]))
    # A map that is the mask itself is perfect by every one of them.
    perfect = masks.double()
    assert relevance_mass_accuracy(perfect, masks).tolist() == [1.0] * 3
    assert relevance_rank_accuracy(perfect, masks).tolist() == [1.0] * 3
    with pytest.raises(CamlensError, match=r"^k must be an integer from 1 to the maps' 42 positions, got 43$"):
        top_k_intersection(x, masks, 43)


def test_auc_is_the_probability_that_inside_scores_higher_ties_a_half():
    x = maps(3, 5, 6, seed=5, ties=True)
    masks = maps(3, 5, 6, seed=6) > 0.5
    auc = mask_auc(x, masks)
    for n in range(3):
        a, s = x[n].flatten().tolist(), masks[n].flatten().tolist()
        inside = [v for v, m in zip(a, s) if m]
        outside = [v for v, m in zip(a, s) if not m]
        pairs = [(p > q) + 0.5 * (p == q) for p, q in itertools.product(inside, outside)]
        assert float(auc[n]) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert float(mask_auc(masks[:1].double(), masks[:1])[0]) == 1.0
    assert math.isnan(float(mask_auc(x[:1], torch.ones_like(masks[:1]))[0]))


def test_signals_and_volumes_are_maps_too():
    signal, volume = maps(2, 50, seed=7), maps(2, 4, 5, 6, seed=8)
    assert sparseness(signal).shape == complexity(volume).shape == (2,)
    mask = torch.zeros(2, 4, 5, 6, dtype=torch.bool)
    mask[:, 1:3, 2:4] = True
    assert torch.allclose(relevance_mass_accuracy(volume, mask), (volume * mask).sum(dim=(1, 2, 3)) / volume.sum(dim=(1, 2, 3)))
    with pytest.raises(CamlensError, match=r"^maps must have shape \(N, H, W\)"):
        sparseness(torch.rand(5))
    with pytest.raises(CamlensError, match=r"^maps must hold finite floating-point values$"):
        complexity(torch.tensor([[1.0, math.nan]]))


def test_evaluate_all_measures_every_metric_as_the_functions_do(tmp_path, capsys):
    """`camlens evaluate --metric all`: every metric in the records and the summary; the complexity
    of each record equals scipy's entropy and the Gini mean difference of the method's map."""
    data = tmp_path / "data"
    for photo, label in (("coffee.png", "espresso"), ("chelsea.png", "tabby")):
        (data / label).mkdir(parents=True)
        Image.open(SAMPLES / photo).convert("RGB").resize((256, 256)).save(data / label / photo)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,xmin,ymin,xmax,ymax\nespresso/coffee.png,40,30,220,220\ntabby/chelsea.png,0,0,256,256\n")
    out = tmp_path / "out"
    code, stdout, err = run(["evaluate", data, "-m", "gradcam", "--steps", "2", "--boxes", boxes, "--metric", "all",
                             "--out", out, "--html"], capsys)
    assert code == 0, err
    # Fourteen metrics do not fit across a terminal: one row per metric, each title whole.
    rows = [line for line in stdout.splitlines() if line.startswith("│ ")]
    assert [row.split("│")[1].strip() for row in rows] == [camlens.evaluate.TITLES[m] for m in camlens.evaluate.METRICS] + ["s / image"]
    page = (out / "report.html").read_text()
    assert all(title in page for title in ("Sparseness (Gini)", "Relevance rank accuracy", "Top-1000 intersection"))
    summary = json.loads((out / "summary.json").read_text())["summary"]["gradcam"]
    assert set(summary) == set(camlens.evaluate.METRICS)
    records = {r["image"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    cat = records["tabby/chelsea.png"]  # its box is the whole image: every position inside
    assert cat["relevance-mass"] == pytest.approx(1.0) and cat["relevance-rank"] == 1.0 and cat["top-k"] == 1.0
    assert math.isnan(cat["auc"])  # no position outside the mask: undefined, left out of the mean
    assert summary["auc"]["n"] == 1
    loaded = efficientnet_lite0()
    for image, record in records.items():
        x = loaded.preprocess(Image.open(data / image).convert("RGB"))[None]
        a = camlens.GradCAM(loaded, optimize=True)(x, record["label"]).maps[0, 0].double().flatten().numpy()
        assert record["complexity"] == pytest.approx(entropy(a), abs=1e-5)
        # The Gini index from the Lorenz curve, G = (n + 1 - 2 sum_i L_i) / n with L the cumulative
        # shares of the sorted values: another identity than the one camlens computes.
        lorenz = np.cumsum(np.sort(a + 1e-7)) / (a + 1e-7).sum()
        assert record["sparseness"] == pytest.approx((a.size + 1 - 2 * lorenz.sum()) / a.size, abs=1e-5)
        assert record["effective-complexity"] == float((a > 1e-5).sum())
        correlation = camlens.metrics.faithfulness_correlation(
            loaded, x, torch.from_numpy(a).float().view(1, 224, 224), torch.tensor([record["label"]]), batch_size=8)
        assert record["faithfulness-correlation"] == pytest.approx(float(correlation[0]), abs=1e-4)
        other = camlens.metrics.random_logit(camlens.GradCAM(loaded, optimize=True), x, [record["label"]],
                                             int(record["sha256"].split(":")[-1][:8], 16))
        assert record["random-logit"] == pytest.approx(float(other[0]), abs=1e-5)


class Linear(torch.nn.Module):
    """f_c(x) = sum_i w_ci x_i + b_c: a model whose logit falls by exactly the sum of w x over the
    positions set to 0."""

    def __init__(self, channels, side, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(classes, channels, side, side, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(classes, dtype=torch.float64))

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.weight) + self.bias


def test_faithfulness_correlation_is_1_where_the_map_is_what_each_value_adds():
    """A linear model of one channel, f_c(x) = sum_p w_cp x_p + b_c: setting the values of S to the
    image's minimum m loses sum over S of w (x - m), which is what the map w (x - m) gives S:
    correlation 1 on every image."""
    from camlens.metrics import faithfulness_correlation

    model = Linear(1, 6).eval()
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    classes = torch.tensor([0, 2, 1])
    exact = model.weight[classes][:, 0] * (x[:, 0] - x.flatten(1).amin(dim=1)[:, None, None])
    assert torch.allclose(faithfulness_correlation(model, x, exact, classes, runs=20, subset_size=5, batch_size=7),
                          torch.ones(3, dtype=torch.float64), atol=1e-12)
    noisy = exact + torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert float(faithfulness_correlation(model, x, noisy, classes, runs=20, subset_size=5).max()) < 1 - 1e-3


def test_faithfulness_correlation_against_a_plain_loop():
    """Quantus's reading: the features are the input's values (3 channels x 25 positions), each
    given the map's value at its position; a number as the baseline, or the image's minimum."""
    from camlens.metrics import faithfulness_correlation, random_subsets

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).double().eval()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = maps(2, 5, 5, seed=4)
    classes = torch.tensor([1, 2])
    for baseline, score in ((0.5, "probability"), ("black", "logit")):
        got = faithfulness_correlation(model, x, a, classes, runs=6, subset_size=4, baseline=baseline, score=score,
                                       seed=9, batch_size=5)
        subsets = random_subsets(2, 75, 6, 4, seed=9)
        for n in range(2):
            def f(image):
                with torch.no_grad():
                    logits = model(image[None])
                return float((logits.softmax(dim=1) if score == "probability" else logits)[0, classes[n]])

            fill = float(x[n].min()) if baseline == "black" else baseline
            given, lost = [], []
            for subset in subsets[n]:
                perturbed = x[n].clone().flatten()
                perturbed[subset] = fill
                lost.append(f(x[n]) - f(perturbed.view(3, 5, 5)))
                given.append(sum(float(a[n].flatten()[int(e) % 25]) for e in subset))
            assert float(got[n]) == pytest.approx(np.corrcoef(given, lost)[0, 1], abs=1e-10)
    assert all(len(set(s.tolist())) == 4 for s in subsets.flatten(0, 1))  # distinct features
    # The subsets of an image do not depend on how many images come after it.
    assert torch.equal(random_subsets(1, 75, 6, 4, seed=9), subsets[:1])


def ssim_by_scipy(a, b, window=7):
    """scikit-image's structural_similarity at its defaults, step by step with scipy's uniform
    filter (reflected borders, cropped away) and sample covariances."""
    from scipy.ndimage import uniform_filter

    data_range = max(a.max(), b.max()) - min(a.min(), b.min())
    norm = window**a.ndim / (window**a.ndim - 1)  # sample covariances over the window
    ux, uy = uniform_filter(a, window), uniform_filter(b, window)
    vx = norm * (uniform_filter(a * a, window) - ux * ux)
    vy = norm * (uniform_filter(b * b, window) - uy * uy)
    vxy = norm * (uniform_filter(a * b, window) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (window - 1) // 2
    return s[tuple(slice(pad, -pad) for _ in range(s.ndim))].mean()


def test_ssim_uniform_is_scikit_images_structural_similarity():
    from camlens.metrics import ssim_uniform

    a, b = maps(3, 12, 15, seed=10), maps(3, 12, 15, seed=11)
    b[0] = a[0] * 0.5 + 0.2  # a related pair
    got = ssim_uniform(a, b)
    for n in range(3):
        assert float(got[n]) == pytest.approx(ssim_by_scipy(a[n].numpy(), b[n].numpy()), abs=1e-12)
    assert torch.allclose(ssim_uniform(a, a), torch.ones(3, dtype=torch.float64))
    assert math.isnan(float(ssim_uniform(torch.ones(1, 8, 8), torch.ones(1, 8, 8))[0]))


def test_random_logit_is_1_for_a_class_agnostic_method_and_draws_another_class():
    from camlens.metrics import random_logit

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(6, 5)).double().eval()
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    classes = torch.tensor([0, 4, 2])
    assert torch.allclose(random_logit(camlens.EigenCAM(model), x, classes), torch.ones(3, dtype=torch.float64))
    seen = {}

    class Recording(camlens.GradCAM):
        def __call__(self, images, targets=None, **kwargs):
            seen.setdefault("targets", []).append(torch.as_tensor(targets).tolist())
            return super().__call__(images, targets, **kwargs)

    value = random_logit(Recording(model, "1"), x, classes, seed=[3, 4, 5])
    own, other = seen["targets"]
    assert own == [0, 4, 2] and all(o != c and 0 <= o < 5 for o, c in zip(other, own))
    expected = [int(torch.randint(4, (1,), generator=torch.Generator().manual_seed(s))) for s in (3, 4, 5)]
    assert other == [d + (d >= c) for d, c in zip(expected, own)]
    random_logit(Recording(model, "1"), x, classes, seed=7)  # one seed: one generator, a draw per image
    expected = torch.randint(4, (3,), generator=torch.Generator().manual_seed(7)).tolist()
    assert seen["targets"][-1] == [d + (d >= c) for d, c in zip(expected, own)]
    gradcam = camlens.GradCAM(model, "1")
    assert torch.allclose(value, camlens.metrics.ssim_uniform(gradcam(x, classes).maps[:, 0],
                                                              gradcam(x, torch.tensor(other)).maps[:, 0]), equal_nan=True)


def test_ssim_of_flattened_maps_as_quantus_random_logit_compares_them():
    from camlens.metrics import ssim_uniform

    a, b = maps(2, 40, seed=13), maps(2, 40, seed=14)
    got = ssim_uniform(a, b, spatial=1)
    for n in range(2):
        assert float(got[n]) == pytest.approx(ssim_by_scipy(a[n].numpy(), b[n].numpy()), abs=1e-12)


def test_ssim_and_random_logit_take_volumes_and_signals_as_they_are():
    from camlens.metrics import random_logit, ssim_uniform

    a, b = maps(2, 8, 9, 10, seed=15), maps(2, 8, 9, 10, seed=16)
    got = ssim_uniform(a, b, spatial=3)
    for n in range(2):
        assert float(got[n]) == pytest.approx(ssim_by_scipy(a[n].numpy(), b[n].numpy()), abs=1e-12)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).double().eval()
    x = torch.randn(2, 2, 30, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    gradcam = camlens.GradCAM(model, "1")
    value = random_logit(gradcam, x, torch.tensor([0, 1]), seed=[1, 2])
    others = [int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(s))) for s in (1, 2)]
    others = [d + (d >= c) for d, c in zip(others, (0, 1))]
    expected = ssim_uniform(gradcam(x, torch.tensor([0, 1])).maps[:, 0], gradcam(x, torch.tensor(others)).maps[:, 0],
                            spatial=1)
    assert torch.allclose(value, expected, equal_nan=True)
