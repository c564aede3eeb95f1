"""Start-up is timed apart from each method's seconds per image (issue 28, item 1): work done once
(the verified inference copy, the model cut at the layer) made slow on purpose on a clock of the
test's own goes to "start-up", never to the first method; the ranking does not depend on the order
of -m. No wall clock: camlens.timing.clock is replaced, and the slow work moves that clock."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import camlens.accelerate
import camlens.methods.gradient_free
from camlens import timing
from helpers import SAMPLES, run


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(timing, "clock", fake)
    return fake


@pytest.fixture
def slow_start_up(monkeypatch, clock):
    """The inference copy costs 100 s and cutting the model at the layer 40 s, each time they are made."""
    make, cut = camlens.accelerate._make, camlens.methods.gradient_free.cut

    def slow_make(*args, **kwargs):
        clock.now += 100
        return make(*args, **kwargs)

    def slow_cut(*args, **kwargs):
        clock.now += 40
        return cut(*args, **kwargs)

    monkeypatch.setattr(camlens.accelerate, "_make", slow_make)
    monkeypatch.setattr(camlens.methods.gradient_free, "cut", slow_cut)
    return clock


@pytest.mark.parametrize("order", [["gradcam", "cam", "ablationcam"], ["ablationcam", "cam", "gradcam"]])
def test_explain_charges_start_up_to_no_method(order, slow_start_up, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, err = run(["explain", SAMPLES / "coffee.png", *[a for m in order for a in ("-m", m)],
                              "--out", out], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    (image,) = manifest["images"]
    assert {name: image["timings"][name] for name in order} == {name: 0.0 for name in order}
    assert manifest["start-up seconds"] == {"warming up the model": 100.0, "cutting the model": 40.0,
                                            "planning the run": 0.0}
    assert "start-up, once per run: 140.00 s (warming up the model 100.00, cutting the model 40.00); not in the " \
           "methods' seconds" in " ".join(printed.split())


def test_evaluate_charges_start_up_to_no_method(slow_start_up, tmp_path, capsys):
    data = tmp_path / "data"
    for photo, label in (("coffee.png", "espresso"), ("chelsea.png", "tabby")):
        (data / label).mkdir(parents=True)
        Image.open(SAMPLES / photo).convert("RGB").resize((256, 256)).save(data / label / photo)
    out = tmp_path / "eval"
    code, printed, err = run(["evaluate", data, "-m", "ablationcam", "-m", "gradcam", "--steps", "2", "--metric",
                              "drop", "--out", out], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(record["seconds"] == 0.0 for record in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start-up seconds"] == {"warming up the model": 100.0, "cutting the model": 40.0,
                                           "planning the run": 0.0}
    assert "note: start-up, once per run: 140.00 s" in err
    # People read display names; files keep the ids.
    assert "Ablation-CAM" in printed and "│ ablationcam" not in printed


def test_nested_start_up_counts_once(clock):
    timing.take_start_up()
    with timing.one_time("outer"):
        clock.now += 3
        with timing.one_time("inner"):
            clock.now += 2
    assert timing.take_start_up() == {"outer": 5.0}
    assert timing.take_start_up() == {}


def test_the_explain_report_shows_the_start_up_apart(slow_start_up, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "ablationcam", "--out", out, "--html"], capsys)
    assert code == 0, err
    html = (out / "report.html").read_text()
    assert "<dt>start-up</dt><dd>warming up the model 100" in html and "once for the run: not in the methods" in html


def test_the_evaluate_report_shows_the_start_up_apart(slow_start_up, tmp_path, capsys):
    data = tmp_path / "data" / "espresso"
    data.mkdir(parents=True)
    Image.open(SAMPLES / "coffee.png").convert("RGB").resize((256, 256)).save(data / "coffee.png")
    out = tmp_path / "eval"
    code, _, err = run(["evaluate", tmp_path / "data", "-m", "gradcam", "--steps", "2", "--metric", "drop",
                        "--out", out, "--html"], capsys)
    assert code == 0, err
    assert "start-up, once per run: 100.00 s (warming up the model 100.00)" in (out / "report.html").read_text()
