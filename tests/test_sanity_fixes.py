"""Regression tests for issue 7 on `camlens sanity`: verdicts that weigh the whole cascade,
a coarser cascade on request, the planned cost and progress lines in logs, and the figures."""

from __future__ import annotations

import copy
import importlib
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import count_rows, make_tiny
from helpers import NET_MODELS, model_module, random_photo, run
from matplotlib.lines import Line2D
from PIL import Image

import camlens
import camlens.charts as charts
from camlens.cli.sanity import DEFAULT_METHODS, _passes
from camlens.combine import is_constant
from camlens.errors import CamlensError
from camlens.methods import METHODS
from camlens.metrics.sanity import (
    cascade_steps,
    cascading_randomisation,
    sanity_verdict,
)

NAN = math.nan
# The module itself: the attribute camlens.cli.sanity is the click command of the same name.
command = importlib.import_module("camlens.cli.sanity")
GROUPS = [f"g{i}" for i in range(21)]


# -- the verdict, on constructed similarity curves -----------------------------------------------

def test_a_map_that_changes_at_once_passes():
    result = sanity_verdict([0.1] * 21)
    assert result == {"verdict": "PASS", "similar_steps": 0, "similar_fraction": 0.0, "changed_from": 0}


def test_a_map_similar_until_the_last_steps_is_late_not_pass():
    """The issue's case: Spearman 0.60-0.96 for 19 of 21 steps, below 0.5 only at the end."""
    curve = [0.96, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.62, 0.7, 0.8, 0.9, 0.93, 0.91, 0.9, 0.88, 0.7, 0.66,
             0.6, 0.3, 0.2]
    result = sanity_verdict(curve, threshold=0.5)
    assert result["verdict"] == "LATE"
    assert result["similar_steps"] == 19 and result["similar_fraction"] == pytest.approx(19 / 21)
    assert result["changed_from"] == 19


def test_a_map_similar_at_the_last_step_fails_whatever_came_before():
    assert sanity_verdict([0.1] * 20 + [0.7])["verdict"] == "FAIL"
    result = sanity_verdict([0.99] * 21)
    assert result["verdict"] == "FAIL" and result["changed_from"] is None and result["similar_steps"] == 21


def test_blank_maps_count_as_changed():
    assert sanity_verdict([NAN] * 21)["verdict"] == "PASS"
    result = sanity_verdict([0.9, None, NAN, *[None] * 18])
    assert result["verdict"] == "PASS" and result["similar_steps"] == 1 and result["changed_from"] == 1


def test_the_share_of_similar_steps_decides_at_its_bound():
    # 8 steps, at most 25% similar: 2 similar steps pass, 3 do not.
    assert sanity_verdict([0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])["verdict"] == "PASS"
    assert sanity_verdict([0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1])["verdict"] == "LATE"
    assert sanity_verdict([0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1], max_similar=0.5)["verdict"] == "PASS"
    # The threshold itself counts as similar.
    assert sanity_verdict([0.5, 0.1], threshold=0.5)["similar_steps"] == 1


def test_a_map_that_changes_then_returns_is_changed_for_good_only_after_its_last_return():
    result = sanity_verdict([0.1, 0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert result["similar_steps"] == 2 and result["changed_from"] == 4 and result["verdict"] == "PASS"


def test_a_blank_trained_map_is_untested_not_passed():
    assert sanity_verdict([NAN] * 5, trained_blank=True)["verdict"] == "UNTESTED"
    with pytest.raises(CamlensError):
        sanity_verdict([])


# -- a coarser cascade ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 3, 5, 7, 20])
def test_cascade_steps_cover_every_group_once_in_order(steps):
    plan = cascade_steps(GROUPS, steps)
    assert len(plan) == steps
    assert [g for names in plan for g in names] == GROUPS
    assert plan[0] == ["g0"] and plan[-1][-1] == "g20" and all(plan)


def test_cascade_steps_by_hand():
    assert cascade_steps(GROUPS, 5) == [GROUPS[:1], GROUPS[1:6], GROUPS[6:11], GROUPS[11:16], GROUPS[16:]]
    assert cascade_steps(GROUPS, 1) == [GROUPS]
    assert cascade_steps(GROUPS) == cascade_steps(GROUPS, 21) == cascade_steps(GROUPS, 99) == [[g] for g in GROUPS]
    with pytest.raises(CamlensError):
        cascade_steps(GROUPS, 0)


def test_a_coarse_cascade_reaches_the_same_models_as_the_full_one(images):
    """Same seed, same groups in the same order: the coarse cascade's first and last maps are
    the full cascade's first and last."""
    model = make_tiny()

    def explain(m):
        return camlens.GradCAMPlusPlus(m, "features")(images).maps

    calls = []
    full = cascading_randomisation(explain, model, images, seed=3)
    coarse = cascading_randomisation(explain, model, images, seed=3, steps=2, progress=lambda *a: calls.append(a))
    assert coarse["steps"] == [["fc"], ["features.4", "features.3", "features.1", "features.0"]]
    assert coarse["maps"].shape == (3, 3, 1, 12, 12) and coarse["spearman"].shape == (2, 3, 1)
    for coarse_index, full_index in ((0, 0), (1, 1), (2, 5)):
        torch.testing.assert_close(coarse["maps"][coarse_index], full["maps"][full_index], rtol=0, atol=0)
    assert calls == [(1, 3), (2, 3), (3, 3)]


# -- the planned cost ----------------------------------------------------------------------------

@pytest.mark.usefixtures("no_inference_copy")  # counts the model's own forwards
@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam"])
def test_planned_forward_passes_match_the_counted_ones(name, images):
    model = make_tiny()
    method = METHODS[name](model, "features")
    rows, handle = count_rows(model)
    method(images[:1], 0)
    handle.remove()
    channels = 8
    planned = _passes(method, channels)
    if name == "scorecam":
        activation = model.features(images[:1])
        constant = int(is_constant(activation).sum())
        assert sum(rows) == 1 + channels - constant + (1 if constant else 0) <= planned == 1 + channels
    else:
        assert sum(rows) == planned == (9 if name == "smoothgradcam++" else 1)


@pytest.fixture
def tiny_cli(tmp_path, monkeypatch):
    model_module(tmp_path, "sanity_fixes_models", NET_MODELS, monkeypatch)
    photo = random_photo(tmp_path / "photo.png", 40, 48)
    return ["sanity", photo, "--model", "sanity_fixes_models:net", "--input-size", "32"]


def test_the_plan_is_printed_first_and_progress_shows_in_a_log(tiny_cli, tmp_path, capsys):
    code, out, err = run([*tiny_cli, "-m", "scorecam", "-m", "smoothgradcam++", "--steps", "2",
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    # Score-CAM: the clean forward + 8 channels; Smooth Grad-CAM++: the clean forward + 8 copies.
    assert re.match(r"camlens sanity: 2 method\(s\) x 3 maps \(trained \+ 2 steps\) = 6 explanations, "
                    r"about 54 forward passes; estimated about \d+ s on cpu, then the figures \(a map, timed on "
                    r"the trained model, Score-CAM's per channel on a sample of them and counted with the randomised "
                    r"model's live channels for the steps: Score-CAM 9 forwards, [\d.]+ s; Smooth Grad-CAM\+\+ 9 "
                    r"forwards, [\d.]+ s; ",
                    lines[0]), lines[0]
    # Off a terminal rich draws nothing: plain lines, at least one per method when it completes.
    assert "Score-CAM: 3/3 (" in err and "Smooth Grad-CAM++: 3/3 (" in err
    report = json.loads((tmp_path / "o" / "sanity.json").read_text())
    assert report["groups"] == ["fc", "body.0", "stem"]
    assert report["steps"] == ["fc", "stem"] and report["step_groups"] == [["fc"], ["body.0", "stem"]]
    assert len(report["methods"]["scorecam"]["spearman"]) == 2


def test_default_methods_leave_score_cam_out_and_the_help_names_them(tiny_cli, tmp_path, capsys):
    code, out, err = run([*tiny_cli, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert list(json.loads((tmp_path / "o" / "sanity.json").read_text())["methods"]) == list(DEFAULT_METHODS)
    assert "scorecam" not in DEFAULT_METHODS
    code, out, _ = run(["sanity", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split()).replace("Grad- CAM", "Grad-CAM")  # click may wrap at a hyphen
    assert "seed method" not in text
    assert "default: CAM, Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++" in text and "-m scorecam" in text


def test_the_criterion_is_stated_in_the_table_and_the_json(tiny_cli, tmp_path, capsys):
    code, out, err = run([*tiny_cli, "-m", "gradcam", "--threshold", "0.4", "--max-similar", "0.1",
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "sanity.json").read_text())
    assert report["max_similar"] == 0.1 and report["threshold"] == 0.4
    assert "Spearman >= 0.4" in report["criterion"] and "<= 10% of the steps" in report["criterion"]
    assert "Criterion: " + report["criterion"][:40] in " ".join(out.split())
    verdict = report["methods"]["gradcam"]
    expected = sanity_verdict(verdict["spearman"], 0.4, 0.1)
    assert verdict["verdict"] == expected["verdict"] and verdict["similar_steps"] == expected["similar_steps"]
    assert f"{verdict['similar_steps']}/3 steps" in out


def test_a_method_blank_on_the_trained_model_is_untested(tiny_cli, tmp_path, monkeypatch, capsys):
    class Blank(camlens.GradCAM):
        name = "blank"
        display_name = "Blank"

        def __call__(self, images, targets=None, **kwargs):
            result = super().__call__(images, targets, **kwargs)
            result.maps = torch.zeros_like(result.maps)
            return result

    monkeypatch.setitem(METHODS, "blank", Blank)
    code, out, err = run([*tiny_cli, "-m", "blank", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "o" / "sanity.json").read_text())["methods"]["blank"]
    assert result["verdict"] == "UNTESTED" and not result["passed"] and result["spearman"] == [None] * 3
    assert "UNTESTED: the trained model's map is blank" in " ".join(out.split())


# -- the figures ---------------------------------------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the charts draw, kept for inspection."""
    made = []
    original = charts.new_figure

    def keep(*args):
        made.append(original(*args))
        return made[-1]

    monkeypatch.setattr(charts, "new_figure", keep)
    return made


def test_sanity_figure_draws_the_maps_over_the_photo_with_legible_step_titles(figures, tmp_path):
    columns = ["trained", *GROUPS]
    saliency = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    rows = {"A": [saliency] * 22, "B": [np.zeros((16, 16))] * 22}
    notes = {"A": ["reference", *["ρ 0.50"] * 21], "B": ["reference", *["blank"] * 21]}
    pictures = []
    for shade in (0, 255):
        photo = Image.new("RGB", (32, 32), (shade, shade, shade))
        charts.sanity_figure(photo, rows, columns, notes, tmp_path / f"{shade}.png")
        pictures.append(np.asarray(Image.open(tmp_path / f"{shade}.png").convert("L"), dtype=float))
    # The photo shows through the maps: a white photo makes a brighter figure than a black one.
    assert pictures[1].mean() > pictures[0].mean() + 20
    figure = figures[-1]
    titles = [ax.get_title() for ax in figure.get_axes() if ax.get_title()]
    assert sorted(titles) == sorted(columns)  # every step named once, above its column
    assert min(ax.title.get_fontsize() for ax in figure.get_axes() if ax.get_title()) >= 9
    # Wrapped to at most 11 steps a line, so that a line fits a screen at a legible size.
    assert figure.get_size_inches()[0] <= 11 * 1.6 + 1
    shown = [ax for ax in figure.get_axes() if ax.images]
    assert len(shown) == 2 * 22
    assert {ax.get_xlabel() for ax in shown} == {"reference", "ρ 0.50", "blank"}


def test_similarity_plot_marks_blank_steps_instead_of_dropping_them(figures, tmp_path):
    similarity = {
        "A": {"spearman": [-0.3, NAN, NAN, 0.1], "ssim": [0.1, 0.02, 0.02, 0.3]},
        "B": {"spearman": [0.9, 0.8, 0.7, 0.2], "ssim": [0.9, 0.8, 0.7, 0.5]},
        "C": {"spearman": [-0.3001, NAN, NAN, 0.1], "ssim": [0.1, 0.02, 0.02, 0.3]},  # A, to within 0.001
    }
    charts.similarity_plot(similarity, ["fc", "b2", "b1", "stem"], 0.5, tmp_path / "s.png",
                           {"A": "PASS", "B": "LATE", "C": "PASS"})
    spearman_axes, ssim_axes = figures[-1].get_axes()
    crosses = [line for line in spearman_axes.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert len(crosses) == 1  # A and C share a line, and its crosses
    assert list(crosses[0].get_xdata()) == [2, 3] and list(crosses[0].get_ydata()) == [-1.0, -1.0]
    ssim_crosses = [line for line in ssim_axes.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_ydata()) for line in ssim_crosses] == [[0.02, 0.02]]
    labels = [text.get_text() for text in spearman_axes.get_legend().get_texts()]
    assert labels == ["A = C: PASS", "B: LATE", "threshold 0.5", "blank map (counts as changed)"]
    assert isinstance(spearman_axes.get_legend().legend_handles[0], Line2D)


# -- the planned cost: measured, not counted (review of issue 7) -----------------------------------

@pytest.mark.usefixtures("no_inference_copy")  # counts the model's own forwards
def _live(model, x):
    """The channels of layer "features" that are not constant over the map (what Score-CAM forwards)."""
    from camlens.combine import is_constant

    return int((~is_constant(command._activation(model, x, "features"))).sum())


def test_the_estimate_is_built_from_timed_explanations_of_each_method(images, monkeypatch):
    """With a clock that moves only when the model forwards (1 ms an image) or a group is
    re-initialised (1 s), a map costs what one real explanation forwards, and a cascade's fixed
    part is one re-initialisation of every group."""
    from camlens.metrics.sanity import randomisation_groups, reinitialise

    now = [0.0]
    model = make_tiny()
    x = images[:1]
    model.register_forward_pre_hook(lambda module, args: now.__setitem__(0, now[0] + 0.001 * args[0].shape[0]))
    monkeypatch.setattr(command, "_clock", lambda: now[0])

    def slow_reinitialise(module):
        now[0] += 1.0
        reinitialise(module)

    monkeypatch.setattr(command, "reinitialise", slow_reinitialise)
    names = ["cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam"]
    objects = command.method_objects(model, names, "features", None, 0)
    groups = randomisation_groups(model, x)
    forward = command._timed_forward(model, x)[1]
    assert forward == pytest.approx(0.001)
    state = torch.get_rng_state()
    per_map, per_cascade = command._measure(model, x, 0, "features", objects, groups, 4, torch.device("cpu"), forward)
    # The fully randomised copy _measure makes (from the same random state), for Score-CAM's steps.
    torch.set_rng_state(state)
    randomised = copy.deepcopy(model)
    for group in groups:
        reinitialise(dict(randomised.named_modules())[group])
    for name in names:  # an independent count: the images one real explanation forwards
        rows, handle = count_rows(model)
        METHODS[name](model, "features")(x, 0)
        handle.remove()
        if name != "scorecam":
            assert per_map[name] == pytest.approx(0.001 * sum(rows)), name
            continue
        # Score-CAM: its map on the trained model, and its steps at the randomised model's count of
        # the channels it forwards (more come alive), with the trained model's clean and zero inputs.
        trained_extra = sum(rows) - 1 - _live(model, x)  # the all-zero input, where a channel is constant
        random_forwards = 1 + trained_extra + _live(randomised, x)
        assert _live(randomised, x) != _live(model, x)  # the case the trained count alone missed
        assert per_map[name] == pytest.approx(0.001 * (sum(rows) + 4 * random_forwards) / 5), name
    assert per_map["smoothgradcam++"] == pytest.approx(0.009)
    assert per_cascade == pytest.approx(len(groups) * 1.0) and len(groups) == 5
    # Each method: the trained model and every step, plus its own cascade's fixed part.
    assert command._estimate(per_map, per_cascade, 4) == pytest.approx(5 * sum(per_map.values()) + 5 * per_cascade)
    assert command._estimate({"a": 0.5, "b": 2.0}, 1.5, 4) == pytest.approx(5 * 2.5 + 2 * 1.5)


def test_the_plan_line_gives_the_estimate_before_any_cascade_work_and_the_end_compares(tiny_cli, tmp_path,
                                                                                        monkeypatch, capsys):

    events = []
    original_echo, original_cascade = command.echo_error, command.cascading_randomisation
    monkeypatch.setattr(command, "echo_error", lambda text: (events.append(text), original_echo(text)))
    monkeypatch.setattr(command, "cascading_randomisation",
                        lambda *a, **k: (events.append("cascade"), original_cascade(*a, **k))[1])
    monkeypatch.setattr(command, "_measure", lambda *a: ({"gradcam": 1.5, "cam": 0.5}, 2.0))
    code, out, err = run([*tiny_cli, "-m", "gradcam", "-m", "cam", "--steps", "2", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert events[0].startswith("camlens sanity: 2 method(s) x 3 maps") and events.index("cascade") == 1
    # 3 maps x (1.5 + 0.5) s + 2 cascades x 2 s
    assert "estimated about 10 s on cpu, then the figures" in events[0]
    assert "Grad-CAM 1 forward, 1.50 s; CAM 1 forward, 0.50 s" in events[0] and "comparisons: 2.00 s)" in events[0]
    seconds = json.loads((tmp_path / "o" / "sanity.json").read_text())["seconds"]
    assert seconds["maps_estimated"] == 10.0 and seconds["maps"] >= 0 and seconds["figures"] > 0
    assert re.search(r"2 steps: maps in \d+ s \(estimated about 10 s\), figures in \d+ s", " ".join(out.split()))


# -- one run at a time per output folder -----------------------------------------------------------

def test_a_second_run_into_a_locked_folder_is_refused_and_leftovers_are_cleared(tiny_cli, tmp_path, capsys):
    from helpers import one_line_error

    from camlens.io import locked_output_dir

    out = tmp_path / "o"
    out.mkdir()
    with locked_output_dir(out, "sanity"):
        code, _, err = run([*tiny_cli, "-m", "gradcam", "--out", out], capsys)
    one_line_error(code, err, 1, f"another camlens run is writing to {out}")
    assert not (out / "sanity.json").exists()
    # What a killed run's write_atomic left behind.
    leftover = out / ".camlens-partial-sanity.png.x1y2.png"
    leftover.write_bytes(b"half a png")
    code, _, err = run([*tiny_cli, "-m", "gradcam", "--out", out], capsys)
    assert code == 0, err
    assert not leftover.exists() and (out / "sanity.json").exists()
    assert not list(out.glob(".camlens-partial-*"))


# -- more steps than groups, CAM skipped, help --------------------------------------------------------

def test_more_steps_than_layer_groups_is_noted_and_the_steps_used_are_recorded(tiny_cli, tmp_path, capsys):
    code, out, err = run([*tiny_cli, "-m", "gradcam", "--steps", "9", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == ["camlens: note: --steps 9 is more than the model's 3 layer groups: one step per group, 3 steps"]
    report = json.loads((tmp_path / "o" / "sanity.json").read_text())
    assert report["steps"] == ["fc", "body.0", "stem"] and len(report["methods"]["gradcam"]["spearman"]) == 3
    code, out, err = run([*tiny_cli, "-m", "gradcam", "--steps", "3", "--out", tmp_path / "o"], capsys)
    assert code == 0 and "note:" not in err


def test_cam_skipped_from_the_defaults_is_recorded_in_the_json_and_under_the_table(tiny_cli, tmp_path, capsys):
    # The stem's 6 channels do not feed the 8-input classifier: CAM does not fit there.
    code, out, err = run([*tiny_cli, "--target-layer", "stem", "--steps", "1", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "sanity.json").read_text())
    assert list(report["skipped_methods"]) == ["cam"] and report["skipped_methods"]["cam"]
    assert list(report["methods"]) == ["gradcam", "gradcam++", "smoothgradcam++"]
    reason = report["skipped_methods"]["cam"]
    assert f"camlens: note: CAM skipped: {reason}" in err.splitlines()
    assert f"CAM skipped: {reason}" in " ".join(out.split())
    code, out, err = run([*tiny_cli, "-m", "gradcam", "--out", tmp_path / "o"], capsys)
    assert code == 0 and json.loads((tmp_path / "o" / "sanity.json").read_text())["skipped_methods"] == {}


def test_help_states_score_cams_cost_in_forwards_not_in_this_machines_seconds(capsys):
    code, out, _ = run(["sanity", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "1,281 forwards a map on the embedded model" in text
    assert not re.search(r"\bCPU\b|minute|\d s\b|seconds", text), text


def test_ssim_matches_a_direct_two_dimensional_window():
    """The separable blur gives the Gaussian-window SSIM computed position by position."""
    from numpy.lib.stride_tricks import sliding_window_view

    from camlens.metrics.sanity import ssim

    generator = np.random.default_rng(4)
    first, second = generator.random((2, 19, 23)), generator.random((2, 19, 23))
    second[1] = first[1] * 0.7 + 0.1
    offsets = np.arange(11) - 5
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    expected = []
    for a, b in zip(first, second):
        pa, pb = sliding_window_view(a, (11, 11)), sliding_window_view(b, (11, 11))

        def mean(t):
            return (t * window).sum(axis=(-2, -1))

        mu_a, mu_b = mean(pa), mean(pb)
        var_a, var_b = mean(pa * pa) - mu_a**2, mean(pb * pb) - mu_b**2
        cov = mean(pa * pb) - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        expected.append((((2 * mu_a * mu_b + c1) * (2 * cov + c2)) /
                         ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean())
    result = ssim(torch.from_numpy(first), torch.from_numpy(second))
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10)
    assert 0.9 < expected[1] < 1 and expected[0] < 0.2


def test_the_plan_counts_each_score_cam_variants_forwards_per_channel():
    """SS-CAM forwards each mask n_samples times and IS-CAM n_steps times: the plan says so."""
    from conftest import make_tiny

    import camlens
    from camlens.cli.sanity import _passes

    model = make_tiny()
    assert _passes(camlens.ScoreCAM(model), 10) == 11
    assert _passes(camlens.get_method("sscam")(model, n_samples=7), 10) == 71
    assert _passes(camlens.get_method("iscam")(model, n_steps=4), 10) == 41


@pytest.mark.parametrize("options", [{"threshold": float("nan")}, {"threshold": 1.5}, {"max_similar": float("nan")},
                                     {"max_similar": -0.1}, {"threshold": float("inf")}])
def test_the_verdicts_bounds_must_be_numbers_in_range(options):
    """A NaN threshold made every verdict PASS (issue 20, finding 12), in Python as on the command line."""
    with pytest.raises(CamlensError, match="must be a"):
        sanity_verdict([0.9, 0.9, 0.9], **options)
