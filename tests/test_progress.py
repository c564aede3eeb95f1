"""Progress in a log: plain lines, no stray blank line, one line when a task finishes."""

from __future__ import annotations

import time
from pathlib import Path

from camlens.cli import main
from camlens.cli.progress import LogProgress


def test_log_lines_are_throttled_and_each_finished_task_says_so(capsys):
    with LogProgress(interval=3600) as bar:
        images = bar.add_task("images", total=2)
        step = bar.add_task("", total=1, visible=False)
        for name in ("a.png", "b.png"):
            bar.update(images, description=name)
            for done in range(1, 5):
                bar.update(step, description="  Score-CAM", completed=done, total=4, visible=True)
            bar.update(step, visible=False)
            bar.advance(images)
    lines = capsys.readouterr().err.splitlines()
    # First update of each run of the step, its completion, then the image's line.
    assert [line.split(" (")[0] for line in lines] == [
        "Score-CAM: 1/4", "Score-CAM: 4/4", "a.png: 1/2",
        "Score-CAM: 1/4", "Score-CAM: 4/4", "b.png: 2/2",
    ]


def test_explain_in_a_log_prints_progress_lines_and_no_blank_line(tmp_path, capsys):
    try:
        main(["explain", str(Path(__file__).resolve().parents[1] / "samples" / "coffee.png"), "-m", "gradcam", "--out", str(tmp_path / "out")])
        code = 0
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err
    assert code == 0
    assert "coffee.png: 1/1" in err
    assert "" not in err.splitlines(), repr(err)


def test_interval_allows_a_line_again_after_it(capsys):
    with LogProgress(interval=0.01) as bar:
        task = bar.add_task("work", total=3)
        bar.advance(task)
        time.sleep(0.02)
        bar.advance(task)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == ["work: 1/3", "work: 2/3"]
