"""The command line's hints lead somewhere (issue 20, finding 18): --output for a model of several
outputs, the model's own dtype, and a state dict given as --model."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import SAMPLES, model_module, one_line_error, run

MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)
        self.aux = nn.Linear(6, 2)

    def forward(self, x):
        pooled = self.features(x).mean(dim=(2, 3))
        return self.fc(pooled), self.aux(pooled)


class Named(Net):
    def forward(self, x):
        scores, aux = super().forward(x)
        return {"scores": scores, "aux": aux}


class Plain(Net):
    def forward(self, x):
        return super().forward(x)[0]


def pair():
    return Net()


def named():
    return Named()


def plain():
    return Plain()


def half():
    return Plain().half()


def bf16():
    return Plain().bfloat16()


def double():
    return Plain().double()
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    model_module(tmp_path, "hintnets", MODELS, monkeypatch)
    return tmp_path


COFFEE = SAMPLES / "coffee.png"


@pytest.mark.parametrize("factory, choice", [("pair", "0"), ("named", "scores")])
def test_output_picks_the_scores_of_a_model_of_several_outputs(models, factory, choice, capsys):
    base = ["explain", COFFEE, "--model", f"hintnets:{factory}", "--input-size", "16", "-m", "gradcam",
            "-m", "scorecam"]
    code, _, err = run([*base, "--out", models / "a"], capsys)
    one_line_error(code, err, 1, "pick one with output= (--output on the command line")
    code, _, err = run([*base, "--output", choice, "--out", models / "b"], capsys)
    assert code == 0, err
    code, _, err = run(["explain", COFFEE, "--model", "hintnets:plain", "--input-size", "16", "-m", "gradcam",
                        "-m", "scorecam", "--out", models / "c"], capsys)
    assert code == 0, err
    picked = json.loads((models / "b" / "manifest.json").read_text())["images"][0]["targets"]
    plain = json.loads((models / "c" / "manifest.json").read_text())["images"][0]["targets"]
    assert picked == plain  # the same class and probability as the model that returns the scores alone
    with __import__("numpy").load(models / "b" / "coffee" / "maps.npz") as b, \
            __import__("numpy").load(models / "c" / "coffee" / "maps.npz") as c:
        for key in ("gradcam/maps", "scorecam/maps"):
            assert abs(b[key] - c[key]).max() < 1e-6


def test_output_reaches_evaluate_and_sanity(models, capsys):
    data = models / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        (data / label / "1.png").write_bytes(COFFEE.read_bytes())
    (models / "names.txt").write_text("a\nb\nc\nd\n")
    code, _, err = run(["evaluate", data, "--model", "hintnets:pair", "--output", "0", "--input-size", "16",
                        "-m", "gradcam", "--metric", "drop", "--class-names", models / "names.txt",
                        "--out", models / "e"], capsys)
    assert code == 0, err
    code, _, err = run(["sanity", COFFEE, "--model", "hintnets:pair", "--output", "0", "--input-size", "16",
                        "-m", "gradcam", "--steps", "1", "--out", models / "s"], capsys)
    assert code == 0, err
    code, _, err = run(["explain", COFFEE, "--model", "hintnets:pair", "--output", "5", "--input-size", "16",
                        "--out", models / "x"], capsys)
    one_line_error(code, err, 1, "output=5: the model returned tuple, which has no element 5")


@pytest.mark.parametrize("factory", ["half", "bf16", "double"])
def test_a_model_in_another_dtype_runs_from_the_command_line(models, factory, capsys):
    """It failed with 'check --input-size': the images were float32."""
    for command in (["explain", COFFEE], ["sanity", COFFEE, "--steps", "1"]):
        code, _, err = run([*command, "--model", f"hintnets:{factory}", "--input-size", "16", "-m", "gradcam",
                            "--out", models / f"{command[0]}-{factory}"], capsys)
        assert code == 0, err


def test_a_state_dict_as_the_model_is_told_to_use_a_factory(models, capsys):
    import hintnets

    path = models / "weights.pt"
    torch.save(hintnets.plain().state_dict(), path)
    code, _, err = run(["explain", COFFEE, "--model", path, "--out", models / "o"], capsys)
    one_line_error(code, err, 1, f"give the code that builds the model with --model module:factory and this file "
                                 f"with --weights {path}")
