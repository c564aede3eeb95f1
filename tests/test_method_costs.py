"""`camlens methods --costs` and CAMMethod.cost (issue 21, item 9): each method's passes per image on
the model at hand, checked against the passes a call really makes (rows counted through the model's
first and last layers)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from helpers import run
from torch import nn

import camlens


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


def options(name):
    return {"seed": 0} if "seed" in inspect.signature(camlens.METHODS[name]).parameters else {}


@pytest.mark.parametrize("name", list(camlens.METHODS))
def test_the_cost_is_what_a_call_forwards(name):
    model = small()
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    method = camlens.METHODS[name](model, "3", **options(name))
    cost = method.cost(6, 8, 8)
    rows = {"first": 0, "last": 0}
    hooks = [model[0].register_forward_hook(lambda m, i, o: rows.__setitem__("first", rows["first"] + o.shape[0])),
             model[6].register_forward_hook(lambda m, i, o: rows.__setitem__("last", rows["last"] + o.shape[0]))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method(images)
    finally:
        for hook in hooks:
            hook.remove()
    first, last = rows["first"] / 3, rows["last"] / 3  # per image
    if name == "gradcam++-general":
        assert (cost.forwards, cost.backwards, cost.after, cost.at_most) == (1, 1, 6, False)  # one per channel
        assert first == 1  # its third-order passes run the cut head under vmap, not the model
        return
    if cost.at_most:
        assert first <= cost.forwards and last <= cost.forwards + cost.after
    else:
        assert first == cost.forwards and last == cost.forwards + cost.after
    assert cost.backwards == (1 if method.needs_gradients and name != "smoothgradcam++" else
                              1 + method.n_samples if name == "smoothgradcam++" else 0)


def test_a_layer_read_at_every_position_costs_a_pass_per_position():
    model = small()
    cost = camlens.METHODS["gradcam++-general"](model, "1").cost(4, 8, 8)  # conv -> conv: no mean after it
    assert (cost.after, cost.at_most) == (4 * 64, False)
    assert camlens.METHODS["gradcam++-general"](model, "1", max_directions=100).cost(4, 8, 8).note.endswith(
        "refused above max_directions=100 (--max-directions raises it)")


def test_the_command_line_counts_them_on_the_model_at_hand(tmp_path, monkeypatch, capsys):
    (tmp_path / "costmodel.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(["methods", "--model", "costmodel:net", "--input-size", "8"], capsys)
    assert code == 0, err
    assert "costmodel:net: passes per image at layer 3 (6 channels, 8x8), default options" in out
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:5]]
            for line in out.splitlines() if line.count("│") > 4 and line.split("│")[1].strip()}
    assert rows["scorecam"] == ["≤ 8", "0", ""]
    assert rows["ablationcam"] == ["2", "0", "≤ 9"]
    assert rows["reciprocam"] == ["2", "0", "≤ 66"]
    assert rows["smoothgradcam++"] == ["9", "9", ""]
    assert rows["gradcam++-general"] == ["1", "1", "6"]
    code, plain, _ = run(["methods"], capsys)  # no model named: the list alone, no model loaded
    assert code == 0 and "passes per image" not in plain


CHECK = ("with a check of the model cut at the layer: a pass of the layers before it (counted as a forward) and "
         "one after it")
SCORE_NOTE = "a constant channel is not forwarded; the all-zero input is, where the baseline needs it"


@pytest.mark.parametrize("name, kwargs, expected", [
    # (forwards, backwards, after, at_most, note) on a layer of K = 6 channels, 3 x 5 positions
    ("cam", {}, (1, 0, 1, False, "after the layer: the check that the logits are fc(GAP(layer))")),
    ("gradcam", {}, (1, 1, 0, False, "")),
    ("eigencam", {}, (1, 0, 0, False, "")),
    ("smoothgradcam++", {}, (9, 9, 0, False, "")),  # 1 + 8 noisy copies, each forward and backward
    ("smoothgradcam++", {"n_samples": 3}, (4, 4, 0, False, "")),
    ("scorecam", {}, (8, 0, 0, True, SCORE_NOTE)),  # the image, the all-zero baseline, one per channel
    ("scorecam", {"top_channels": 4}, (6, 0, 0, True, SCORE_NOTE)),
    ("scorecam", {"top_channels": 40}, (8, 0, 0, True, SCORE_NOTE)),  # no more than the layer has
    ("scorecam", {"top_channels": 0.25}, (4, 0, 0, True, SCORE_NOTE)),  # 1.5 channels, rounded half up
    ("scorecam", {"top_channels": 0.2}, (3, 0, 0, True, SCORE_NOTE)),  # 1.2: 1
    ("scorecam", {"top_channels": 0.01}, (3, 0, 0, True, SCORE_NOTE)),  # 0.06: at least 1
    ("sscam", {}, (2 + 6 * 35, 0, 0, True, SCORE_NOTE)),  # 35 noisy masks per channel
    ("iscam", {}, (2 + 6 * 10, 0, 0, True, SCORE_NOTE)),  # 10 steps per channel
    ("ablationcam", {}, (2, 0, 6 + 3, True, "a channel that is zero everywhere is not ablated; " + CHECK)),
    ("reciprocam", {}, (2, 0, 3 * 5 + 2, True, CHECK)),
    ("gradcam++-general", {}, (1, 1, 6, False, "third-order passes: one per channel")),  # a mean-only head
])
def test_each_methods_cost_by_hand_on_an_oblong_layer(name, kwargs, expected):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 5))
    cost = camlens.METHODS[name](model, "1", **options(name), **kwargs).cost(6, 3, 5)
    assert (cost.forwards, cost.backwards, cost.after, cost.at_most, cost.note) == expected


def test_the_third_order_cost_where_the_head_reads_every_position():
    conv_head = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 15, 5))
    cost = camlens.METHODS["gradcam++-general"](conv_head, "1").cost(6, 3, 5)
    assert (cost.forwards, cost.backwards, cost.after, cost.at_most) == (1, 1, 6 * 15, False)
    assert cost.note == "third-order passes: one per channel and position"
    capped = camlens.METHODS["gradcam++-general"](conv_head, "1", max_directions=89).cost(6, 3, 5)
    assert capped.note == ("third-order passes: one per channel and position; refused above max_directions=89 "
                           "(--max-directions raises it)")
    assert camlens.METHODS["gradcam++-general"](conv_head, "1", max_directions=90).cost(6, 3, 5).note == (
        "third-order passes: one per channel and position")


class Branching(nn.Module):
    """A Python branch on a tensor after the layer: the model cannot be traced, so not cut there."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        a = self.conv(x)
        if a.sum() > 0:
            a = a * 2
        return self.fc(a.mean(dim=(2, 3)))


@pytest.mark.parametrize("model, layer, at_most, note", [
    (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)),
     None, True, " and position, or per channel where the head reads the layer through its mean only"),  # default
    (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)),
     ["0", "1"], True, " and position, or per channel where the head reads the layer through its mean only"),
    (Branching(), "conv", False, " and position"),  # not known to read the mean only: every position
])
def test_the_third_order_cost_where_the_head_is_unknown(model, layer, at_most, note):
    cost = camlens.METHODS["gradcam++-general"](model, layer).cost(6, 3, 5)
    assert (cost.after, cost.at_most, cost.note) == (6 * 15, at_most, "third-order passes: one per channel" + note)
