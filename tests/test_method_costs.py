"""`camlens methods --costs` and CAMMethod.cost (issue 21, item 9): each method's passes per image on
the model at hand, checked against the passes a call really makes (rows counted through the model's
first and last layers)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import camlens
from helpers import run


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
