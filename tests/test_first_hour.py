"""Issue 28, "no surprises in the first hour": a run with nothing to do leaves nothing behind (item 4)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from helpers import SAMPLES, run


def listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in folder.rglob("*"))


def test_a_missing_input_makes_no_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, err = run(["explain", tmp_path / "nothere.jpg", "--out", out], capsys)
    assert code == 1
    assert err.splitlines() == [f"camlens: error: nothing to explain: {tmp_path / 'nothere.jpg'}: no such file"]
    assert printed == "" and not out.exists()  # was a table of dashes, a manifest and a lock file


def test_a_missing_input_leaves_an_earlier_run_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "cam", "--out", out], capsys)
    assert code == 0, err
    before = listing(out)
    code, _, err = run(["explain", tmp_path / "nothere.jpg", tmp_path / "gone.png", "--out", out], capsys)
    assert code == 1
    assert err.splitlines() == [f"failed: {tmp_path / 'nothere.jpg'}: no such file",
                                f"failed: {tmp_path / 'gone.png'}: no such file",
                                "camlens: error: nothing to explain: none of the inputs is an image or array file that can be read"]
    assert listing(out) == before


def test_a_missing_input_beside_a_good_one_is_one_failed_line(tmp_path, capsys):
    out = tmp_path / "out"
    photo = tmp_path / "coffee.png"
    shutil.copy(SAMPLES / "coffee.png", photo)
    code, _, err = run(["explain", photo, tmp_path / "nothere.jpg", "-m", "cam", "--out", out], capsys)
    assert code == 1
    assert f"failed: {tmp_path / 'nothere.jpg'}: no such file" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(image["status"] for image in manifest["images"]) == ["failed", "ok"]


# -- classes by any name (item 3) ------------------------------------------------------------------

def test_a_word_of_several_classes_lists_them(tmp_path, capsys):
    code, _, err = run(["explain", SAMPLES / "chelsea.png", "--class", "cat", "-m", "cam", "--out", tmp_path / "o"],
                       capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("camlens: error: class 'cat' names no class, but is a word of 7: 281 (tabby, tabby cat), "
                          "282 (tiger cat), 283 (Persian cat), 284 (Siamese cat, Siamese), 285 (Egyptian cat), ")
    assert err.rstrip().endswith("give one by its index (--class 281)")
    assert "crate" not in err and "oxcart" not in err  # was: did you mean 'crate' or 'oxcart' or 'castle'?


def test_a_word_of_one_class_is_that_class(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(["explain", SAMPLES / "chelsea.png", "--class", "egyptian", "-m", "cam", "--out", out], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"] == {"class": 285}


def test_a_word_is_whole_not_part_of_one(tmp_path, capsys):
    from camlens.datasets import class_index_lookup, word_matches
    from camlens.models import imagenet_class_names, imagenet_labels

    lookup = class_index_lookup(imagenet_class_names(), imagenet_labels())
    assert 484 not in word_matches("cat", lookup)  # catamaran
    assert word_matches("Tiger  Cat", lookup) == [282]
    assert word_matches("281", lookup) == []


def test_evaluate_lists_the_classes_an_unknown_folder_may_be(tmp_path, capsys):
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    shutil.copy(SAMPLES / "chelsea.png", data / "chelsea.png")
    code, _, err = run(["evaluate", tmp_path / "data", "-m", "cam", "--out", tmp_path / "eval"], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert "label(s) the model does not know: cat ('cat' may be 281 (tabby, tabby cat), 282 (tiger cat)" in err
    assert "name the folders by class names, or give a mapping file (label,index)" in err


# -- intervals inside the range, one colour per method (items 5 and 6) -----------------------------

def test_one_colour_per_method_in_every_panel_and_chart():
    """Colours followed groups of equal bars: Score-CAM was green in three panels and orange in a fourth."""
    from matplotlib.colors import to_hex

    from camlens.charts import draw_bar_chart, draw_curve_plot

    def stat(mean):
        return {"mean": mean, "low": mean * 0.9, "high": mean * 1.1, "n": 8}

    summary = {"cam": {"drop": stat(10.0), "deletion": stat(0.2)},
               "gradcam": {"drop": stat(10.0), "deletion": stat(0.3)},  # equal to CAM in one panel only
               "scorecam": {"drop": stat(5.0), "deletion": stat(0.3)}}  # equal to Grad-CAM in the other
    figure = draw_bar_chart(summary, ["drop", "deletion"], {"drop": "Average Drop", "deletion": "Deletion"})
    colours = [[to_hex(bar.get_facecolor()) for bar in ax.patches] for ax in figure.axes]
    assert colours[0] == colours[1] and len(set(colours[0])) == 3
    curves = {"deletion": {m: [0.5, 0.2 + i / 10, 0.1] for i, m in enumerate(summary)}}
    lines = draw_curve_plot(curves).axes[0].get_lines()
    assert [to_hex(line.get_color()) for line in lines] == colours[0]


def test_the_terminal_table_prints_intervals_inside_the_range(tmp_path, capsys):
    data = tmp_path / "data"
    for photo, label in (("coffee.png", "espresso"), ("chelsea.png", "tabby")):
        (data / label).mkdir(parents=True)
        shutil.copy(SAMPLES / photo, data / label / photo)
    out = tmp_path / "eval"
    code, printed, err = run(["evaluate", data, "-m", "cam", "--steps", "2", "--metric", "insertion", "--out", out],
                             capsys)
    assert code == 0, err
    assert "±" not in printed and "(n < 5)" in printed  # was "0.507 ± 4" for two images
    summary = json.loads((out / "summary.json").read_text())["summary"]["cam"]["insertion"]
    assert summary["n"] == 2 and summary["low"] is None and summary["high"] is None


# -- a plan before long runs (item 2) -----------------------------------------------------------------

@pytest.fixture
def everything_is_long(monkeypatch):
    """Every run counts as long: the thresholds at 0, and a clock that moves 1 s per reading."""
    import itertools

    from camlens import timing
    from camlens.cli import common

    ticks = itertools.count()
    monkeypatch.setattr(timing, "clock", lambda: float(next(ticks)))
    monkeypatch.setattr(common, "PLAN_FROM", 0.0)
    monkeypatch.setattr(common, "LONG_RUN", 0.0)
    return common


def test_a_long_run_says_its_plan_and_goes_on_when_nobody_can_answer(everything_is_long, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "-m", "scorecam", "--out", out], capsys)
    assert code == 0, err
    plan = next(line for line in err.splitlines() if line.startswith("camlens: plan: "))
    assert plan.startswith("camlens: plan: 1 image(s); Score-CAM: ≤ ")
    assert "Grad-CAM: 1 forward(s) + 1 backward(s) per image" in plan and "timed now on the first image" in plan
    assert "camlens: note: a long run (the costliest: Score-CAM, Grad-CAM; or fewer methods (-m), --top-channels N" \
           in err and "it goes on (not interactive)" in err
    assert (out / "manifest.json").exists()


def test_an_interactive_long_run_asks_and_a_no_leaves_nothing(everything_is_long, monkeypatch, tmp_path, capsys):
    asked = []
    monkeypatch.setattr(everything_is_long, "interactive", lambda: True)
    monkeypatch.setattr(everything_is_long.click, "confirm", lambda text, **kw: asked.append(text) or False)
    out = tmp_path / "o"
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "--out", out], capsys)
    assert code == 1 and len(asked) == 1 and asked[0].startswith("camlens: this run may take ")
    assert "camlens: error: not started: give --yes to run it without asking" in err
    assert not out.exists()
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "--out", out, "--yes"], capsys)
    assert code == 0 and len(asked) == 1  # --yes: not asked


def test_evaluate_plans_the_images_still_to_do(everything_is_long, tmp_path, capsys):
    data = tmp_path / "data"
    for photo, label in (("coffee.png", "espresso"), ("chelsea.png", "tabby")):
        (data / label).mkdir(parents=True)
        shutil.copy(SAMPLES / photo, data / label / photo)
    out = tmp_path / "eval"
    code, _, err = run(["evaluate", data, "-m", "gradcam", "--steps", "3", "--metric", "deletion", "--out", out,
                        "--limit", "1"], capsys)
    assert code == 0, err
    plan = next(line for line in err.splitlines() if line.startswith("camlens: plan: "))
    # The method's forward and backward, and 3 deletion steps.
    assert plan.startswith("camlens: plan: 1 image(s); Grad-CAM: 4 forward(s) + 1 backward(s) per image")
    code, _, err = run(["evaluate", data, "-m", "gradcam", "--steps", "3", "--metric", "deletion", "--out", out],
                       capsys)
    assert code == 0, err
    assert "camlens: plan: 1 image(s)" in err  # resumed: one image left


# -- error wording (item 8) ----------------------------------------------------------------------------

def test_cams_refusal_names_the_classifier_and_what_is_between():
    import torch
    from torch import nn

    import camlens

    class NormedHead(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.norm = nn.LayerNorm(8)
            self.classifier = nn.Linear(8, 4)

        def forward(self, x):
            return self.classifier(self.norm(self.features(x).mean(dim=(2, 3))))

    with pytest.raises(camlens.CamlensError) as error:
        camlens.explain(NormedHead().eval(), torch.randn(2, 3, 8, 8), "cam")
    message = str(error.value)
    assert "fc(global average pool of layer 'features'), fc being 'classifier'" in message
    assert "does something else between the layer and its linear classifier (a norm" in message
    assert "pick that layer" not in message


def test_a_pil_image_points_at_the_preprocessing():
    from PIL import Image
    from torch import nn

    import camlens

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(camlens.CamlensError, match=r"not a PIL image: preprocess it as the model expects, e\.g\. "
                                                   r"camlens\.models\.Preprocess\(\)\(image\)"):
        camlens.explain(model, Image.new("RGB", (8, 8)), "gradcam")
    from camlens.models import Preprocess

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a blank picture: blank maps
        explanation = camlens.explain(model, Preprocess()(Image.new("RGB", (300, 260))), "gradcam")
    assert explanation.maps.shape == (1, 1, 224, 224)


# -- reports meant to be sent (item 6) ----------------------------------------------------------------

def test_reports_show_no_absolute_local_path(tmp_path, capsys):
    """The explain report's footer said "from /home/<user>/...", the evaluate report's facts the data folder."""
    home = tmp_path / "home" / "ann" / "holiday pictures"
    home.mkdir(parents=True)
    shutil.copy(SAMPLES / "coffee.png", home / "coffee.png")
    out = tmp_path / "home" / "ann" / "runs" / "demo"
    code, _, err = run(["explain", home / "coffee.png", "-m", "cam", "--out", out, "--html"], capsys)
    assert code == 0, err
    html = (out / "report.html").read_text()
    assert "/home/ann" not in html and str(tmp_path) not in html
    assert "from <code>demo</code>" in html
    assert str(home / "coffee.png") in (out / "coffee" / ".camlens").read_text()  # the run's JSON keeps it

    data = tmp_path / "home" / "ann" / "data"
    (data / "espresso").mkdir(parents=True)
    shutil.copy(SAMPLES / "coffee.png", data / "espresso" / "coffee.png")
    evaluated = tmp_path / "home" / "ann" / "runs" / "eval"
    code, _, err = run(["evaluate", data, "-m", "cam", "--steps", "2", "--metric", "drop", "--out", evaluated,
                        "--html"], capsys)
    assert code == 0, err
    html = (evaluated / "report.html").read_text()
    assert "/home/ann" not in html and str(tmp_path) not in html
    assert "<code>.../data</code>" in html


def test_private_keeps_what_is_no_path(tmp_path):
    from camlens.report import private

    values = {"ratio": "similar at 4/4 steps", "url": "https://example.org/a/b", "relative": "tabby/chelsea.png",
              "base64": "data:image/jpeg;base64,ab+/cd/ef==", "number": 3}
    assert private(values, tmp_path) == values
    assert private([f"{tmp_path}/x/y.png", "/etc/passwd"], tmp_path) == ["x/y.png", ".../passwd"]
