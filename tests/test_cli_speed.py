"""The speed options of the command line: --optimize/--no-optimize, --compile, --top-channels."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from helpers import SAMPLES, one_line_error, run


def explain(tmp_path, capsys, *extra):
    out = tmp_path / "out"
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "--device", "cpu", "--out", out, *extra],
                       capsys)
    assert code == 0, err
    data = json.loads((out / "manifest.json").read_text())
    maps = np.load(out / "coffee" / "maps.npz")
    return data, maps


def test_the_inference_copy_is_the_cpu_default_and_gives_the_same_maps(tmp_path, capsys):
    fast, fast_maps = explain(tmp_path / "a", capsys)
    plain, plain_maps = explain(tmp_path / "b", capsys, "--no-optimize")
    assert fast["engine"] == {"optimize": True, "compile": False}
    assert plain["engine"] == {"optimize": False, "compile": False}
    assert fast_maps.files == plain_maps.files
    for key in fast_maps.files:
        assert np.abs(fast_maps[key].astype(float) - plain_maps[key].astype(float)).max() <= 1e-5, key
    assert fast["images"][0]["predictions"][0]["class"] == plain["images"][0]["predictions"][0]["class"]


@pytest.mark.parametrize(
    "args, text",
    [
        (["--compile", "--no-optimize"], "--compile compiles the inference copy that --no-optimize turns off"),
        (["--top-channels", "8"], "--top-channels applies to iscam, scorecam, sscam: add one of them with -m"),
        (["-m", "scorecam", "--top-channels", "0"], "top_channels must be"),
        (["-m", "scorecam", "--top-channels", "1.5"], "top_channels must be"),
    ],
)
def test_bad_speed_options_are_one_line_errors(tmp_path, capsys, args, text):
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "--out", tmp_path / "o", *args], capsys)
    one_line_error(code, err, 1, text)


def test_top_channels_text_that_is_no_number_is_refused(tmp_path, capsys):
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "scorecam", "--top-channels", "many",
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and "neither a count of channels nor a fraction" in err


def test_top_channels_runs_faster_score_cam_and_records_its_channels(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "scorecam", "--top-channels", "6",
                        "--out", out], capsys)
    assert code == 0, err
    data = json.loads((out / "manifest.json").read_text())
    options = data["options"]["scorecam"]
    assert options["top_channels"] == 6
    assert "chosen_channels" not in options or len(options["chosen_channels"]["features"][0]) == 6


def test_the_methods_of_a_run_share_one_inference_copy():
    from camlens.cli.common import method_objects
    from conftest import make_tiny

    model = make_tiny()
    objects = method_objects(model, ["gradcam", "gradcam++", "scorecam"], "features", None, 0,
                             engine={"optimize": True, "compile": False})
    copies = {id(method._copies) for method in objects.values()}
    assert len(copies) == 1
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    for method in objects.values():
        method(x)
    (shared,) = {method._copies for method in objects.values()}
    assert shared.get(model, x) is not None and len(shared._made) == 1


def test_sanity_leaves_the_copy_off_unless_asked():
    from camlens.cli.common import engine_settings

    cpu = torch.device("cpu")
    assert engine_settings(None, False, cpu, default=False) == {"optimize": False, "compile": False}
    assert engine_settings(True, False, cpu, default=False) == {"optimize": True, "compile": False}
    assert engine_settings(None, False, cpu) == {"optimize": True, "compile": False}
    assert engine_settings(None, False, torch.device("meta")) == {"optimize": False, "compile": False}


def test_top_channels_reach_every_method_that_takes_them():
    from conftest import make_tiny

    from camlens.cli.common import method_objects

    objects = method_objects(make_tiny(), ["scorecam", "sscam", "iscam", "gradcam"], "features", None, 0,
                             top_channels=3)
    assert [objects[name].top_channels for name in ("scorecam", "sscam", "iscam")] == [3, 3, 3]
    assert "top_channels" not in objects["gradcam"].options()
