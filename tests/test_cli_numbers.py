"""Every numeric option of every command refuses NaN and infinity in one line (issue 20, finding 12),
and --threads is bounded by the machine's cores (finding 13): found by walking the commands, so an
option added later is covered too."""

from __future__ import annotations

import click
import pytest

from camlens.cli import cli
from camlens.cli.common import cores
from helpers import SAMPLES, one_line_error, run


def float_options():
    found = []
    for name, command in cli.commands.items():
        for parameter in command.params:
            kinds = parameter.type.types if isinstance(parameter.type, click.Tuple) else [parameter.type]
            floats = [isinstance(kind, click.types.FloatParamType) for kind in kinds]
            if any(floats) and isinstance(parameter, click.Option):
                found.append((name, parameter.opts[0], len(kinds)))
    return found


FLOAT_OPTIONS = float_options()


def test_the_walk_finds_the_float_options():
    names = {option for _, option, _ in FLOAT_OPTIONS}
    assert {"--threshold", "--max-similar", "--mean", "--std", "--lambda", "--lr", "--val-split"} <= names


@pytest.mark.parametrize("command, option, arity", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_numbers_are_refused(command, option, arity, value, tmp_path, capsys):
    argument = {"explain": [SAMPLES / "coffee.png"], "sanity": [SAMPLES / "coffee.png"], "evaluate": [SAMPLES],
                "train-ggam": [SAMPLES], "layers": [], "methods": [], "report": [tmp_path]}[command]
    out = ["--out", tmp_path / "o"] if any("--out" in p.opts for p in cli.commands[command].params) else []
    code, _, err = run([command, *argument, option, *([value] * arity), *out], capsys)
    one_line_error(code, err, 2, "Invalid value for")
    assert "is not a finite number" in err or ("inf" in value and "is not in the range" in err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["explain", "evaluate", "sanity"])
def test_threads_beyond_the_cores_are_refused_in_one_line(command, tmp_path, capsys):
    code, _, err = run([command, SAMPLES / "coffee.png", "--threads", "100000", "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, 2, f"100000 is more than 4 x this machine's {cores()} cores")
