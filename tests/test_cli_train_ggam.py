"""``camlens train-ggam`` on tiny data (64 px, 3 classes, no pretrained weights): the run folder,
the plan and per-epoch lines, Ctrl-C and --resume, one-line refusals, explain --model afterwards,
the training curves' content and the blank maps of the localisation report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import camlens.charts as charts
import camlens.cli.train_ggam as command
from camlens.ggam.train import localisation_report
from camlens.metrics import localisation_correct
from helpers import ggam_args as args
from helpers import ggam_data, run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ggam_data(tmp_path_factory.mktemp("data"))


def test_writes_the_run_and_prints_the_plan_each_epoch_and_a_summary(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run(args(data, out), capsys)
    assert code == 0, stderr
    for name in ("train.json", "history.jsonl", "history.csv", "last.pt", "best.pt", "run.json",
                 "localisation.json", "curves.png"):
        assert (out / name).is_file(), name
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    lines = stderr.splitlines()
    assert "" not in lines  # stderr is not a terminal: plain lines, no bar and no blank line left by one
    assert lines[0].startswith("train-ggam: 6 training and 3 validation images, 3 classes, 2 epochs, "
                               "2 batches of up to 4 per epoch, on cpu")
    epoch_lines = [line for line in lines if line.startswith("epoch ") and "train CE" in line]
    expected = [f"epoch {r['epoch']}/2: train CE {r['train_ce']:.4f}, L_GGAM {r['train_ggam']:.4f}, "
                f"train acc {r['train_accuracy']:.1%}, val acc {r['val_accuracy']:.1%}, {r['seconds']:.1f} s"
                for r in history]
    assert epoch_lines == expected
    assert "epoch 1/2: 2/2" in stderr  # the per-epoch bar, as log lines
    best = json.loads((out / "run.json").read_text())["extra"]["best epoch"]
    assert f" {best}* " in stdout and stdout.count("* ") == 1
    report = json.loads((out / "localisation.json").read_text())
    assert f"blank maps: {report['blank maps']} of 3" in stdout
    assert f"energy pointing game {report['energy pointing game']:.3f}" in stdout
    assert f"camlens explain --model {out} IMAGE" in stdout
    with Image.open(out / "curves.png") as image:
        assert image.size == (1000, 400)

    # The run explains as a model afterwards.
    image = data[1] / "circle" / "0.png"
    code, _, err = run(["explain", image, "--model", out, "-m", "gradcam", "--out", tmp_path / "maps",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    assert any((tmp_path / "maps").rglob("*.png"))


def test_a_frozen_run_evaluates_with_no_extra_flags(data, tmp_path, capsys):
    """--freeze-backbone and --keep last reach the trainer; `camlens evaluate --model RUN_DIR` loads the run
    (class names, preprocessing) and its energy pointing game is the run's own report."""
    out = tmp_path / "run"
    code, stdout, stderr = run(args(data, out, "--freeze-backbone", "--keep", "last"), capsys)
    assert code == 0, stderr
    settings = json.loads((out / "train.json").read_text())
    assert settings["freeze backbone"] is True and settings["keep"] == "last"
    last, kept = torch.load(out / "last.pt", weights_only=True)["model"], torch.load(out / "best.pt", weights_only=True)
    assert all(torch.equal(last[k], kept[k]) for k in last)  # --keep last: the last epoch's model
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert f"kept: the last epoch, 2 (validation accuracy {history[-1]['val_accuracy']:.1%}" in stdout
    assert "*: the last epoch (--keep last)" in stdout
    assert stderr.splitlines()[1] == ("train-ggam: first the frozen backbone's feature maps of 15 images (the "
                                      "training images and their mirror images, then the validation images), "
                                      "computed once")
    val = data[1]
    code, stdout, stderr = run(["evaluate", val, "--model", out, "--boxes", val / "boxes.csv", "-m", "gradcam",
                                "--metric", "energy", "--out", tmp_path / "eval", "--device", "cpu"], capsys)
    assert code == 0, stderr
    records = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    report = json.loads((out / "localisation.json").read_text())
    energies = [r["energy"] for r in records]
    assert np.mean(energies) == pytest.approx(report["energy pointing game"], abs=1e-5)


def test_ctrl_c_leaves_a_run_that_resume_finishes(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = command.train_ggam

    def interrupted(*positional, progress, **keywords):
        def stop_in_epoch_two(epoch, batch, batches):
            if epoch == 2:
                raise KeyboardInterrupt
            progress(epoch, batch, batches)
        return real(*positional, progress=stop_in_epoch_two, **keywords)

    monkeypatch.setattr(command, "train_ggam", interrupted)
    code, _, err = run(args(data, out), capsys)
    assert code == 130
    assert err.splitlines()[-1] == (f"camlens: interrupted; the run in {out} continues with the same command "
                                    "and --resume")
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert len((out / "history.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(command, "train_ggam", real)

    code, _, err = run(args(data, out), capsys)  # the same command without --resume is refused
    assert code == 1 and err.count("\n") == 1 and "--resume" in err
    code, _, err = run(args(data, out, "--resume"), capsys)
    assert code == 0, err
    assert "1 done, resuming" in err.splitlines()[0]
    assert [line.split(":")[0] for line in err.splitlines() if "train CE" in line] == ["epoch 2/2"]
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("extra, code, message", [
    (["--attention", "bogus"], 2, "Invalid value for '--attention'"),
    (["--resize", "32"], 1, "bad input size 64 (resize 32)"),
    (["--lambda", "nan"], 2, "'nan' is not a finite number"),
    (["--lr", "inf"], 2, "'inf' is not a finite number"),
    # Trained a whole epoch and marked the run finished before it failed (issue 20, finding 15):
    (["--input-size", "1", "--resize", "1"], 1, "input size 1 leaves the backbone a 1x1 feature map"),
    (["--input-size", "32", "--resize", "32"], 1, "input size 32 leaves the backbone a 1x1 feature map"),
])
def test_bad_options_are_one_line(data, tmp_path, capsys, extra, code, message):
    got, out, err = run(args(data, tmp_path / "run", *extra), capsys)
    assert got == code and out == ""
    assert err.count("\n") == 1 and err.startswith("camlens: error: ") and message in err, err
    assert not (tmp_path / "run" / "train.json").exists() and not (tmp_path / "run" / "run.json").exists()


def test_an_empty_dataset_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run(["train-ggam", tmp_path / "empty", "--out", tmp_path / "run", "--no-pretrained"], capsys)
    assert code == 1 and out == ""
    assert err == f"camlens: error: {tmp_path / 'empty'}: a classifier needs at least two classes, the dataset has 0\n"


def test_training_curves_draw_the_history_and_mark_the_best_epoch(tmp_path, monkeypatch):
    history = [{"epoch": e, "train_ce": ce, "train_ggam": g, "train_accuracy": a, "val_accuracy": v}
               for e, ce, g, a, v in [(1, 1.1, 0.30, 0.4, 0.5), (2, 0.8, 0.20, 0.6, 0.75),
                                      (3, 0.5, 0.10, 0.9, 0.75)]]
    figures = []
    real = charts.new_figure
    monkeypatch.setattr(charts, "new_figure", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    charts.training_curves(history, tmp_path / "curves.png")
    loss_ax, accuracy_ax = figures[0].axes
    lines = {line.get_label(): line for ax in (loss_ax, accuracy_ax) for line in ax.get_lines()}
    assert list(lines["train CE"].get_ydata()) == [1.1, 0.8, 0.5]
    assert list(lines["train L_GGAM"].get_ydata()) == [0.30, 0.20, 0.10]
    assert list(lines["train"].get_ydata()) == [0.4, 0.6, 0.9]
    assert list(lines["validation"].get_ydata()) == [0.5, 0.75, 0.75]
    # The best epoch is the first with the highest validation accuracy, as train_ggam keeps it.
    marks = [line for ax in (loss_ax, accuracy_ax) for line in ax.get_lines() if line.get_label() == "best epoch (2)"]
    assert len(marks) == 2 and all(list(line.get_xdata()) == [2, 2] for line in marks)
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 0


def test_the_localisation_report_counts_blank_maps_apart():
    maps = torch.zeros(3, 8, 8)
    maps[0, 0:4, 0:4] = 1.0  # all inside its box
    maps[1, 0:4, 0:8] = 1.0  # half inside
    boxes = [[(0.0, 0.0, 4.0, 4.0)], [(0.0, 0.0, 4.0, 4.0)], [(0.0, 0.0, 4.0, 4.0)]]  # map 2 is blank
    report = localisation_report(maps, boxes)
    iou, correct = localisation_correct(maps, boxes)
    assert report["images"] == 3 and report["blank maps"] == 1
    assert report["energy pointing game"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert report["non-blank"]["images"] == 2
    assert report["non-blank"]["energy pointing game"] == pytest.approx((1.0 + 0.5) / 2)
    assert report["box iou"] == pytest.approx(float(iou.mean()))
    assert report["non-blank"]["box iou"] == pytest.approx(float(iou[:2].mean()))
    assert float(iou[2]) == 0.0 and float(iou[0]) == pytest.approx(1.0)
    assert report["non-blank"]["localisation accuracy (iou >= 0.5)"] == pytest.approx(float(correct[:2].mean()))
    assert localisation_report(torch.zeros(1, 8, 8), boxes[:1])["non-blank"] is None


def test_mostly_blank_maps_come_with_the_reason_and_what_to_do(tmp_path, capsys):
    from camlens.ggam.train import TrainResult

    row = {"epoch": 1, "train_ce": 1.0, "train_ggam": 0.0, "train_accuracy": 0.5, "val_accuracy": 0.5,
           "val_ce": 1.0, "seconds": 1.0}
    means = {"images": 10, "energy pointing game": 0.0, "box iou": 0.0, "localisation accuracy (iou >= 0.5)": 0.0}
    for blank, attention, shown in ((6, "both", True), (6, "spatial", True), (5, "both", False), (10, "channel", False)):
        report = {**means, "blank maps": blank, "non-blank": None}
        command._print_summary(TrainResult(tmp_path, [row], 1, 0.5, 0.5, report, []), tmp_path, attention)
        stdout = capsys.readouterr().out
        assert ("most maps are blank" in stdout) == shown, (blank, attention)
