"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import torch
from torch import nn

import camlens
from camlens.metrics import (
    area_under_curve,
    average_drop,
    average_increase,
    box_iou,
    box_mask,
    cascading_randomisation,
    connected_components,
    deletion_curve,
    drop_and_increase,
    energy_pointing_game,
    insertion_curve,
    localisation_boxes,
    localisation_correct,
    pointing_game,
    spearman,
    ssim,
)

from conftest import make_tiny


class RegionMean(nn.Module):
    """Two classes; logit 0 is the mean of channel 0 over rows 0-1, columns 0-1 (region R)."""

    def forward(self, x):
        m = x[:, 0, :2, :2].mean(dim=(1, 2))
        return torch.stack([m, torch.zeros_like(m)], dim=1)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def ranking_map():
    """R's four pixels rank first, then the others in a fixed order."""
    ranking = torch.arange(16, 0, -1, dtype=torch.float64).view(4, 4) / 16
    ranking[:2, :2] += 1
    return ranking / ranking.max()


def test_deletion_curve_by_hand():
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    curve = deletion_curve(RegionMean(), x, ranking_map()[None], torch.tensor([0]), steps=4)
    expected = torch.tensor([[sigmoid(1), 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(curve, expected)
    area = (sigmoid(1) + 0.5) / 2 / 4 + 0.5 * 3 / 4
    torch.testing.assert_close(area_under_curve(curve), torch.tensor([area], dtype=torch.float64))
    # A map that ranks R last deletes it last: the score holds until the final step.
    worst = deletion_curve(RegionMean(), x, 1 - ranking_map()[None], torch.tensor([0]), steps=4)
    torch.testing.assert_close(worst[0, :4], torch.full((4,), sigmoid(1), dtype=torch.float64))
    assert area_under_curve(worst) > area_under_curve(curve)


def test_insertion_curve_reveals_the_region_first():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 4
    ranking = torch.zeros(8, 8, dtype=torch.float64)
    ranking[:2, :2] = 1  # R first (16 pixels per step of 64 / 4: R is revealed at step 1)
    curve = insertion_curve(RegionMean(), x, ranking[None], torch.tensor([0]), steps=4, kernel_size=5, sigma=2.0)
    inside = sigmoid(x[0, 0, :2, :2].mean().item())
    torch.testing.assert_close(curve[0, 1:], torch.full((4,), inside, dtype=torch.float64))
    assert abs(curve[0, 0].item() - inside) > 1e-3  # step 0 is the blurred image


def test_average_drop_and_increase_by_hand():
    original = torch.tensor([0.8, 0.5, 0.2])
    explained = torch.tensor([0.4, 0.6, 0.2])
    torch.testing.assert_close(average_drop(original, explained), torch.tensor([50.0, 0.0, 0.0]))
    torch.testing.assert_close(average_increase(original, explained), torch.tensor([0.0, 100.0, 0.0]))
    # On a model with known outputs: p = sigmoid(mean of R); the map halves R, so O = sigmoid(m / 2).
    x = torch.full((2, 1, 4, 4), 2.0, dtype=torch.float64)
    x[1] = -2.0
    maps = torch.full((2, 4, 4), 0.5, dtype=torch.float64)
    result = drop_and_increase(RegionMean(), x, maps, torch.tensor([0, 0]))
    y = torch.tensor([sigmoid(2), sigmoid(-2)], dtype=torch.float64)
    o = torch.tensor([sigmoid(1), sigmoid(-1)], dtype=torch.float64)
    torch.testing.assert_close(result["probability"], y)
    torch.testing.assert_close(result["explained_probability"], o)
    torch.testing.assert_close(result["drop"], 100 * (y - o).clamp(min=0) / y)
    torch.testing.assert_close(result["increase"], torch.tensor([0.0, 100.0], dtype=torch.float64))


def test_energy_pointing_game():
    inside = torch.zeros(1, 10, 10)
    inside[0, 2:5, 3:7] = torch.rand(3, 4) + 0.1
    mask = box_mask([(3, 2, 7, 5)], 10, 10)[None]
    torch.testing.assert_close(energy_pointing_game(inside, mask), torch.tensor([1.0]))
    half = torch.zeros(1, 10, 10)
    half[0, 0, 0] = 1.0
    half[0, 3, 4] = 1.0
    torch.testing.assert_close(energy_pointing_game(half, mask), torch.tensor([0.5]))
    torch.testing.assert_close(energy_pointing_game(torch.zeros(1, 10, 10), mask), torch.tensor([0.0]))
    two_boxes = box_mask([(0, 0, 1, 1), (3, 2, 7, 5)], 10, 10)[None]
    torch.testing.assert_close(energy_pointing_game(half, two_boxes), torch.tensor([1.0]))


def test_pointing_game_tolerance():
    maps = torch.zeros(2, 100, 100)
    maps[0, 50, 50] = 1.0  # centre (50.5, 50.5)
    maps[1, 50, 80] = 1.0  # centre (80.5, 50.5)
    boxes = [[(40, 40, 60, 60)], [(40, 40, 60, 60)]]
    torch.testing.assert_close(pointing_game(maps, boxes), torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(pointing_game(maps, boxes, tolerance=21.0), torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_box_iou_by_hand():
    first = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]])
    second = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 4.0, 4.0]])
    torch.testing.assert_close(box_iou(first, second), torch.tensor([1 / 7, 0.0, 1.0]))


def test_connected_components_and_localisation_box():
    masks = torch.zeros(1, 6, 8, dtype=torch.bool)
    masks[0, 0:2, 0:2] = True  # 4 pixels
    masks[0, 3:6, 4:8] = True  # 12 pixels
    masks[0, 2, 3] = True  # touches the big one diagonally (8-connectivity)
    labels = connected_components(masks)
    assert labels[0, 0, 0] != labels[0, 4, 5]
    assert labels[0, 2, 3] == labels[0, 4, 5]
    assert len(set(labels[0][masks[0]].tolist())) == 2
    maps = masks.float() * 0.5
    maps[0, 4, 5] = 1.0
    maps[0, 5, 0] = 0.1  # below 20% of the maximum: ignored
    boxes = localisation_boxes(maps)
    torch.testing.assert_close(boxes, torch.tensor([[3.0, 2.0, 8.0, 6.0]], dtype=torch.float64))
    best, correct = localisation_correct(maps, [[(3, 2, 8, 6), (0, 0, 1, 1)]])
    torch.testing.assert_close(best, torch.tensor([1.0], dtype=torch.float64))
    assert correct.item() == 1.0
    best, correct = localisation_correct(maps, [[(0, 0, 2, 2)]])
    assert best.item() == 0.0 and correct.item() == 0.0


def test_connected_components_match_a_flood_fill():
    """Same partition as a plain breadth-first flood fill over the 8 neighbours, on random masks."""
    generator = torch.Generator().manual_seed(5)
    masks = torch.rand(4, 17, 23, generator=generator) < 0.45
    labels = connected_components(masks)
    for mask, label in zip(masks.tolist(), labels.tolist()):
        seen: dict[tuple[int, int], int] = {}
        for start in ((i, j) for i in range(17) for j in range(23) if mask[i][j]):
            if start in seen:
                continue
            seen[start], queue = len(seen) + 1, [start]
            ident = seen[start]
            while queue:
                i, j = queue.pop()
                for a in range(i - 1, i + 2):
                    for b in range(j - 1, j + 2):
                        if 0 <= a < 17 and 0 <= b < 23 and mask[a][b] and (a, b) not in seen:
                            seen[(a, b)] = ident
                            queue.append((a, b))
        pairs = {(seen[(i, j)], label[i][j]) for (i, j) in seen}
        assert len({x for x, _ in pairs}) == len({y for _, y in pairs}) == len(pairs)  # a bijection
        assert all(label[i][j] == 0 for i in range(17) for j in range(23) if not mask[i][j])


def test_equal_largest_components_give_the_first_in_row_major_order():
    maps = torch.zeros(1, 6, 8)
    maps[0, 2:6, 0] = 1.0  # a vertical bar of 4, first pixel (2, 0)
    maps[0, 1, 3:7] = 1.0  # a horizontal bar of 4, first pixel (1, 3): first in row-major order
    torch.testing.assert_close(localisation_boxes(maps), torch.tensor([[3.0, 1.0, 7.0, 2.0]], dtype=torch.float64))


def test_spearman_with_ties_and_ssim():
    first = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
    second = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ranks_a = torch.tensor([1.0, 2.5, 2.5, 4.0])
    ranks_b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a, b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    expected = (a * b).sum() / (a.norm() * b.norm())
    torch.testing.assert_close(spearman(first, second).float(), expected)
    torch.testing.assert_close(spearman(first, -second).float(), -expected)
    assert torch.isnan(spearman(torch.zeros(2, 2), second))
    torch.manual_seed(0)
    maps = torch.rand(3, 32, 32)
    torch.testing.assert_close(ssim(maps, maps), torch.ones(3, dtype=torch.float64))
    assert (ssim(maps, torch.rand(3, 32, 32)) < 0.2).all()


def test_cascading_randomisation_leaves_the_model_and_changes_the_maps(images):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = cascading_randomisation(
        lambda m: camlens.GradCAM(m, "features")(images).maps, model, images, seed=0
    )
    assert result["groups"] == ["fc", "features.4", "features.3", "features.1", "features.0"]
    assert result["maps"].shape == (6, 3, 1, 12, 12)
    torch.testing.assert_close(result["maps"][0], camlens.GradCAM(model, "features")(images).maps)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert result["spearman"].shape == (5, 3, 1)
    assert result["ssim"][-1].mean() < 0.9  # the fully randomised model explains differently
    again = cascading_randomisation(lambda m: camlens.GradCAM(m, "features")(images).maps, model, images, seed=0)
    torch.testing.assert_close(again["maps"], result["maps"], rtol=0, atol=0)


def test_known_endpoints_are_not_forwarded_again():
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    model = RegionMean()
    rows = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    full = deletion_curve(model, x, ranking_map()[None], torch.tensor([0]), steps=4)
    assert sum(rows) == 5
    rows.clear()
    known = torch.tensor([sigmoid(1)], dtype=torch.float64)
    reused = deletion_curve(model, x, ranking_map()[None], torch.tensor([0]), steps=4, probability=known)
    assert sum(rows) == 4
    torch.testing.assert_close(reused, full)
    rows.clear()
    inserted = insertion_curve(model, x, ranking_map()[None], torch.tensor([0]), steps=4, probability=known)
    assert sum(rows) == 4 and inserted[0, -1].item() == sigmoid(1)
