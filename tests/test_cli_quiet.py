"""What the libraries underneath print reaches the terminal summarised, never as their tracebacks
or source lines (issue 20, finding 17): torch on an exported model, matplotlib on a glyph."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from helpers import SAMPLES, run


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pt2")
    program = torch.export.export(small(), (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = folder / "small.pt2"
    torch.export.save(program, path)
    return path


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_an_exported_model_loads_with_a_summary_not_torchs_warnings(archive, tmp_path):
    """In a process of its own: pytest would catch the warnings that a user's terminal shows."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-m", "camlens", "explain", str(SAMPLES / "coffee.png"), "--model",
                           str(archive), "--input-size", "32", "-m", "gradcam", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=environment, timeout=300)
    err = done.stderr
    assert done.returncode == 0, err
    assert "camlens: note: a library warned (FutureWarning: " in err  # torch warns when it loads an archive
    assert "Warning:" not in "".join(line for line in lines(err) if not line.startswith("camlens: note:"))
    assert ".py:" not in err  # no source location of a warning
    notes = [line for line in lines(err) if line.startswith("camlens: note: a library warned")]
    assert len(notes) <= 1


def test_a_damaged_archive_is_one_line_with_torchs_cause(archive, tmp_path, capfd):
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(broken, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[: len(data) // 3] if name.endswith("weight_0") else data)
    code, _, _ = run(["explain", SAMPLES / "coffee.png", "--model", broken, "--input-size", "32", "--out", tmp_path / "o"])
    err = capfd.readouterr().err
    assert code == 1
    assert len(lines(err)) == 1, err  # was torch's logged traceback, 30 lines, before camlens's line
    assert err.startswith("camlens: error: ") and "cannot load the torch.export archive" in err
    assert "warnings above" not in err and "out of bounds" in err


def test_a_name_the_font_cannot_draw_is_one_note(tmp_path, capfd):
    photo = tmp_path / "咖啡.png"
    shutil.copy(SAMPLES / "coffee.png", photo)
    code, _, _ = run(["explain", photo, "-m", "cam", "--out", tmp_path / "o"])
    err = capfd.readouterr().err
    assert code == 0, err
    assert "Glyph" not in err and "canvas.draw()" not in err
    assert "camlens: note: the font (DejaVu Sans) has no glyph for 2 character(s) of the names in the figures (咖啡)" in err
