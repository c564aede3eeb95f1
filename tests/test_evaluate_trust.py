"""camlens evaluate never presents impossible or stale numbers as current (issue 20, findings 8-10):
values outside a metric's range are damage, the report and the summary count the same images,
and the derived files never stand beside results they were not computed from."""

from __future__ import annotations

import json

import pytest

from helpers import run
from test_evaluate_fixes import records, setup, summary  # noqa: F401 (a fixture)


@pytest.mark.parametrize("field, text", [
    ("drop", "-500"),
    ("drop", "1e999"),  # json reads it as infinity
    ("drop", "1" + "0" * 400),  # an integer no float can hold
    ("increase", "250.0"),
    ("deletion", "-0.5"),
    ("probability", "7"),
    ("probability", "NaN"),
    ("seconds", "-1"),
    ("seconds", "Infinity"),
    ("label", "-3"),
])
def test_values_outside_their_range_are_set_aside_as_damaged(setup, field, text, capsys):  # noqa: F811
    code, _, err = run(setup.args(), capsys)
    assert code == 0, err
    expected = summary(setup.out)["summary"]
    lines = (setup.out / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert field in first
    marker = "__VALUE__"
    damaged = json.dumps({**first, field: marker}).replace(f'"{marker}"', text)
    (setup.out / "results.jsonl").write_text("\n".join([damaged, *lines[1:]]) + "\n")
    code, _, err = run(setup.args(), capsys)
    assert code == 0, err
    assert "Traceback" not in err
    noted = [line for line in err.splitlines() if "results.jsonl line 1:" in line]
    assert len(noted) == 1 and f"field {field!r}" in noted[0], err
    assert "set aside in results.set-aside.jsonl, its result is computed again" in noted[0]
    assert summary(setup.out)["summary"] == expected  # the pair computed again, the same numbers
    assert len(records(setup.out)) == len(lines)
    # And once more: the run is whole again, nothing is said.
    code, _, err = run(setup.args(), capsys)
    assert code == 0 and "results.jsonl line" not in err


def test_a_curve_of_values_that_are_not_probabilities_is_set_aside(setup, capsys):  # noqa: F811
    code, _, err = run(setup.args(), capsys)
    assert code == 0, err
    lines = (setup.out / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["insertion_curve"][1] = 40.0
    (setup.out / "results.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    code, _, err = run(setup.args(), capsys)
    assert code == 0, err
    assert "results.jsonl line 1: field 'insertion_curve' holds values that are not probabilities" in err


def test_an_undefined_metric_value_is_still_kept(setup, capsys):  # noqa: F811
    """NaN is a metric's own answer (Average Drop where the class probability is 0): not damage."""
    code, _, err = run(setup.args("--limit", "1"), capsys)
    assert code == 0, err
    lines = (setup.out / "results.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "drop": float("nan")})
    (setup.out / "results.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run(setup.args("--limit", "1"), capsys)
    assert code == 0, err
    assert "set aside" not in err
