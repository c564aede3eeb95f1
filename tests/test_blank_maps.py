"""A blank map is never silent (issue 21, item 4): flagged per image and target, warned of once
with the reason, marked in the command line's summary, evaluate's results and the report."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import camlens
from camlens.errors import BlankMapWarning
from camlens.methods import METHODS
from helpers import model_module, page_script, random_photo, run

NEGATIVE = '''
import torch
from torch import nn


class Net(nn.Module):
    """Every class weight negative: the more a channel is active, the lower every score."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.fc.weight.copy_(-self.fc.weight.abs() - 0.1)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def net():
    return Net()
'''


@pytest.fixture
def negative(tmp_path, monkeypatch):
    model_module(tmp_path, "blanknet", NEGATIVE, monkeypatch)
    import blanknet

    return blanknet.net().eval()


IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
OPTIONS = {"gradcam++-general": {"score": "exp"}, "sscam": {"seed": 0}, "smoothgradcam++": {"seed": 0}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_blank_flags_exactly_the_maps_that_are_zero_everywhere(negative, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = camlens.explain(negative, IMAGES, name, targets=[[0, 1], [2, 0]], **OPTIONS.get(name, {}))
    zero = explanation.maps.flatten(2).amax(dim=2) == 0
    assert torch.equal(explanation.blank, zero)
    blank_warnings = [w for w in caught if issubclass(w.category, BlankMapWarning)]
    assert len(blank_warnings) == (1 if bool(zero.any()) else 0)
    if zero.any():
        message = str(blank_warnings[0].message)
        assert f"{int(zero.sum())} of 4 maps are blank" in message
        assert set(explanation.blank_reasons()) == {tuple(i) for i in zero.nonzero().tolist()}


@pytest.mark.parametrize("name, reason", [
    ("gradcam", "every channel's weight is negative or zero"),
    ("cam", "every channel's weight is negative or zero"),
    ("gradcam++", "every weight is 0: the score's gradient at the layer is zero or negative everywhere"),
    ("layercam", "every weight is 0: the score's gradient at the layer is zero or negative everywhere"),
    ("hirescam", "the weighted activations sum to zero or less at every position"),
])
def test_negative_class_weights_give_blank_maps_with_the_reason(negative, name, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BlankMapWarning)
        explanation = camlens.explain(negative, IMAGES, name)
    assert bool(explanation.blank.all())
    assert all(why.startswith(reason) for why in explanation.blank_reasons().values())


def test_a_smoothed_method_warns_once(negative):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        camlens.explain(negative, IMAGES, "gradcam", aug_smooth=True)
    assert len([w for w in caught if issubclass(w.category, BlankMapWarning)]) == 1


def test_the_command_line_and_the_report_mark_blank_maps(negative, tmp_path, capsys):
    photo = random_photo(tmp_path / "p.png", 16, 16)
    code, out, err = run(["explain", photo, "--model", "blanknet:net", "--input-size", "16", "-m", "gradcam",
                          "-m", "eigencam", "--out", tmp_path / "o", "--html"], capsys)
    assert code == 0, err
    assert "blank map: p.png, Grad-CAM, class 0: every channel's weight is negative or zero" in err
    assert "blank: Grad-CAM" in out and "Eigen-CAM" not in out.split("blank:")[1].split("\n")[0]
    record = json.loads((tmp_path / "o" / "manifest.json").read_text())["images"][0]
    assert list(record["blank"]) == ["gradcam"] and record["blank"]["gradcam"][0]["target"] == 0
    page = page_script((tmp_path / "o" / "report.html").read_text(encoding="utf-8"), "camlens-explain")
    assert page["blank"] == [{"gradcam": [0]}]


def test_evaluate_records_and_counts_blank_maps(negative, tmp_path, capsys):
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        random_photo(data / label / "1.png", 16, 16)
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    code, _, err = run(["evaluate", data, "--model", "blanknet:net", "--input-size", "16", "-m", "gradcam",
                        "-m", "eigencam", "--metric", "drop", "--class-names", tmp_path / "names.txt",
                        "--out", tmp_path / "e"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "e" / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["blank"]) for r in records} == {("gradcam", True), ("eigencam", False)}
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["blank maps"] == {"gradcam": 2, "eigencam": 0}
    assert "note: Grad-CAM: 2 of 2 map(s) are blank (zero everywhere)" in err
