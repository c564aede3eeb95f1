"""The command line's shell: the top-level help, the layers table, file-system failures."""

from __future__ import annotations

import re

from helpers import run


def test_layers_table_names_every_column(capsys):
    code, out, _ = run(["layers"], capsys)
    assert code == 0
    header = next(line for line in out.splitlines() if "layer" in line and "type" in line)
    cells = [cell.strip() for cell in re.split(r"[┃|]", header) if cell.strip()]
    assert cells == ["layer", "type", "output (C x H x W)", "note"]


def test_top_level_help_lists_every_command_without_cutting_it_off(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    listed = out.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in listed] == ["evaluate", "explain", "layers", "methods", "report", "sanity", "train-ggam"]
    assert not any(line.rstrip().endswith("...") for line in listed), listed


def test_a_file_system_failure_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    import camlens.cli.info as info

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "results.jsonl"))

    monkeypatch.setattr(info, "list_methods", full)
    code, out, err = run(["methods"], capsys)
    assert code == 1
    assert err == f"camlens: error: {tmp_path / 'results.jsonl'}: No space left on device\n"
