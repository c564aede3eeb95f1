"""Runs on several processes (issue 22): ``torchrun -m camlens evaluate`` on 2 processes gives the
single-process table; a 2-process run killed mid-way and resumed with 1 process ends with every
(image, method) pair exactly once and the same table; the results files of the processes merge
under the store's rules; ``explain`` over a folder writes each image once, ``sanity`` gives the
same verdicts, and ``train-ggam`` trains the weights of one process (frozen backbone) and resumes
on another number. The processes are real: torchrun on this machine, gloo over loopback, a free
port each time (``--standalone``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camlens.distributed import Group, WorkQueue, join
from camlens.evaluate import ResultStore, shard_name

TORCHRUN = Path(sys.executable).with_name("torchrun")

# Slow enough (a pause per forward pass) that a run can be killed half-way.
SLOWNET = """
import time
import torch
from torch import nn


class Slow(nn.Module):
    def __init__(self, pause):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.pause = pause

    def forward(self, x):
        time.sleep(self.pause)
        return self.head(self.features(x))


def net():
    return Slow(0.0)


def slow():
    return Slow(0.05)
"""


@pytest.fixture
def data(tmp_path):
    """12 noise photos of 3 classes, of two sizes; the model module beside them."""
    rng = np.random.default_rng(1)
    for label in "abc":
        folder = tmp_path / "data" / label
        folder.mkdir(parents=True)
        for i in range(4):
            size = (20, 24) if i % 2 else (24, 20)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    (tmp_path / "slownet.py").write_text(SLOWNET)
    return tmp_path


def command(root: Path, out: str, model: str = "slownet:net", processes: int = 1) -> list[str]:
    args = ["-m", "camlens", "evaluate", str(root / "data"), "--model", model, "--input-size", "16",
            "-m", "gradcam", "-m", "scorecam", "--class-names", str(root / "names.txt"), "--out", str(root / out)]
    if processes == 1:
        return [sys.executable, *args]
    return [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}", *args]


def environment(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def finished(args: list[str], root: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=environment(root), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def without_times(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds_per_image", "start-up seconds", "results.jsonl bytes")}


def test_two_processes_give_the_single_process_table(data):
    finished(command(data, "one"), data)
    two = finished(command(data, "two", processes=2), data)
    one_summary = json.loads((data / "one" / "summary.json").read_text())
    two_summary = json.loads((data / "two" / "summary.json").read_text())
    assert without_times(two_summary) == without_times(one_summary)
    assert two_summary["images"] == 12 and two_summary["summary"]["scorecam"]["drop"]["n"] == 12
    # Each pair once, with the same numbers (the time aside), and nothing left of the second process.
    pairs = [(r["image"], r["method"]) for r in records(data / "two")]
    assert len(pairs) == len(set(pairs)) == 24
    strip = {(r["image"], r["method"]): {k: v for k, v in r.items() if k != "seconds"} for r in records(data / "one")}
    assert {(r["image"], r["method"]): {k: v for k, v in r.items() if k != "seconds"}
            for r in records(data / "two")} == strip
    assert not (data / "two" / shard_name(1)).exists()
    assert "camlens evaluate: 12 images" in two.stdout and two.stdout.count("Grad-CAM") == 1
    # One process speaks: the table and the notes once.
    assert two.stderr.count("note: start-up, once per run") == 1


def killed_half_way(data: Path, out: Path, processes: int) -> None:
    """A slow run into ``out`` killed (SIGKILL to every process) once 6 result lines are written
    (by both processes, where there are 2)."""
    started = subprocess.Popen(command(data, out.name, model="slownet:slow", processes=processes),
                               env=environment(data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and started.poll() is None:
            written = sum(len(path.read_bytes().splitlines()) for path in out.glob("results*.jsonl")) if out.is_dir() else 0
            if written >= 6 and (processes == 1 or (out / shard_name(1)).is_file()):
                break
            time.sleep(0.05)
        assert started.poll() is None, "the run ended before it could be killed"
        os.killpg(started.pid, signal.SIGKILL)
    finally:
        started.wait(timeout=60)
    assert 6 <= sum(len(path.read_bytes().splitlines()) for path in out.glob("results*.jsonl")) < 24


def test_a_one_process_run_killed_half_way_resumes_with_two(data):
    finished(command(data, "one"), data)
    out = data / "killed"
    killed_half_way(data, out, 1)
    finished(command(data, "killed", model="slownet:slow", processes=2), data)
    pairs = [(r["image"], r["method"]) for r in records(out)]
    assert len(pairs) == len(set(pairs)) == 24 and not list(out.glob("results.rank*.jsonl"))
    one_summary = json.loads((data / "one" / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["summary"] == one_summary["summary"]


def test_a_two_process_run_killed_half_way_resumes_with_one(data):
    finished(command(data, "one"), data)
    out = data / "killed"
    killed_half_way(data, out, 2)
    assert (out / shard_name(1)).is_file()
    # The report of the killed run shows what every process wrote.
    finished([sys.executable, "-m", "camlens", "report", str(out)], data)
    assert "(results.rank*.jsonl), are shown too" in (out / "report.html").read_text(encoding="utf-8")
    resumed = finished(command(data, "killed", model="slownet:slow"), data)
    pairs = [(r["image"], r["method"]) for r in records(out)]
    assert len(pairs) == len(set(pairs)) == 24
    assert not list(out.glob("results.rank*.jsonl"))
    one_summary = json.loads((data / "one" / "summary.json").read_text())
    resumed_summary = json.loads((out / "summary.json").read_text())
    # The same table; a line cut short by the kill is set aside and its pair computed again.
    assert resumed_summary["summary"] == one_summary["summary"]
    assert resumed_summary["images"] == 12
    assert "camlens evaluate: 12 images" in resumed.stdout


CONFIG = {"--method": ["gradcam"], "--metric": ["drop"]}


def line(image: str, drop: float = 1.0) -> str:
    return json.dumps({"image": image, "method": "gradcam", "label": 0, "prediction": 0, "sha256": "sha256:" + "0" * 64,
                       "boxes": [], "probability": 0.5, "seconds": 0.1, "drop": drop}) + "\n"


def test_the_other_processes_results_merge_under_the_stores_rules(tmp_path):
    """Results of a killed 2- and 3-process run: rank files beside results.jsonl are read after it,
    in rank order; a line cut short is set aside, a line a killed merge already moved is dropped
    silently, a second differing result is set aside (the first kept); the rank files are gone."""
    images = {"a.png", "b.png", "c.png", "d.png", "e.png"}
    ResultStore(tmp_path, CONFIG, images)  # config.json
    (tmp_path / "results.jsonl").write_text(line("a.png") + line("b.png"))
    (tmp_path / shard_name(1)).write_text(line("c.png") + line("a.png") + line("d.png")[:-9])
    (tmp_path / shard_name(2)).write_text(line("e.png") + line("b.png", drop=2.0))
    store = ResultStore(tmp_path, CONFIG, images)
    assert sorted(image for image, _ in store.records) == ["a.png", "b.png", "c.png", "e.png"]
    assert store.records[("b.png", "gradcam")]["drop"] == 1.0
    assert [note.split(":")[0] for note in store.set_aside] == [f"{shard_name(1)} line 3", f"{shard_name(2)} line 2"]
    assert "cut short" in store.set_aside[0] and "a second result" in store.set_aside[1]
    assert not list(tmp_path.glob("results.rank*.jsonl"))
    assert [json.loads(x)["image"] for x in (tmp_path / "results.jsonl").read_text().splitlines()] == [
        "a.png", "b.png", "c.png", "e.png"]
    # A helper process reads what rank 0 checked and writes to its own file; rank 0 merges it.
    helper = ResultStore(tmp_path, CONFIG, images, rank=1)
    assert set(helper.records) == set(store.records)
    helper.add(json.loads(line("d.png")))
    assert (tmp_path / shard_name(1)).is_file()
    store.merge()
    assert ("d.png", "gradcam") in store.records and not (tmp_path / shard_name(1)).exists()


def test_one_process_is_a_group_of_one_and_its_queue_hands_out_every_unit_once(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = join()
    assert (group.rank, group.world, group.main, group.distributed) == (0, 1, True, False)
    queue = WorkQueue(group, "test", 5)
    assert list(queue) == [0, 1, 2, 3, 4] and list(queue) == []
    assert queue.finished(2) == 2 and queue.done() == 2
    seen = []
    queue.wait(2, seen.append)
    assert seen == [2]
    assert group.from_main(lambda: 7) == 7 and group.collect([1]) == [[1]]
    assert Group().device(__import__("torch").device("cpu")).type == "cpu"


def test_explain_over_a_folder_on_two_processes_writes_each_image_once(data):
    args = ["explain", *(str(data / "data" / label) for label in "abc"), "--model", "slownet:net", "--input-size", "16", "-m", "gradcam",
            "-m", "eigencam", "--class-names", str(data / "names.txt")]
    finished([sys.executable, "-m", "camlens", *args, "--out", str(data / "one")], data)
    two = finished([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "camlens", *args,
                    "--out", str(data / "two")], data)
    one_manifest = json.loads((data / "one" / "manifest.json").read_text())
    two_manifest = json.loads((data / "two" / "manifest.json").read_text())

    def images(manifest):
        return [{k: v for k, v in image.items() if k != "timings"} for image in manifest["images"]]

    assert two_manifest["status"] == "complete" and len(two_manifest["images"]) == 12
    assert images(two_manifest) == images(one_manifest)  # the same outputs, in the inputs' order
    folders = sorted(p.name for p in (data / "two").iterdir() if p.is_dir())
    assert folders == sorted(image["output"] for image in two_manifest["images"])
    for image in two_manifest["images"]:
        marker = json.loads((data / "two" / image["output"] / ".camlens").read_text())
        assert marker["run"]["id"] == two_manifest["run id"]
    marker = json.loads((data / "two" / ".camlens-run.json").read_text())
    assert set(folders) <= set(marker["files"])
    assert "error" not in two.stderr


def test_sanity_on_two_processes_gives_the_single_process_verdicts(data):
    args = ["sanity", str(data / "data" / "a" / "0.png"), "--model", "slownet:net", "--input-size", "16",
            "-m", "gradcam", "-m", "eigencam", "-m", "gradcam++"]
    finished([sys.executable, "-m", "camlens", *args, "--out", str(data / "one")], data)
    two = finished([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "camlens", *args,
                    "--out", str(data / "two")], data)
    one_record = json.loads((data / "one" / "sanity.json").read_text())
    two_record = json.loads((data / "two" / "sanity.json").read_text())
    assert list(two_record["methods"]) == ["gradcam", "eigencam", "gradcam++"]  # in the order asked
    assert two_record["methods"] == one_record["methods"] and two_record["status"] == "complete"
    one_maps, two_maps = np.load(data / "one" / "maps.npz"), np.load(data / "two" / "maps.npz")
    assert all(np.array_equal(one_maps[name], two_maps[name]) for name in one_maps.files)
    assert two.stdout.count("camlens sanity:") == 1 and "error" not in two.stderr


def train_command(data: Path, out: str, processes: int, *extra: str) -> list[str]:
    args = ["train-ggam", str(data / "data"), "--class-names", str(data / "names.txt"), "--no-pretrained",
            "--input-size", "64", "--resize", "64", "--batch-size", "6", "--val-split", "0.25", "--seed", "3",
            "--out", str(data / out), *extra]
    if processes == 1:
        return [sys.executable, "-m", "camlens", *args]
    return [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}", "-m", "camlens", *args]


def weights(path: Path) -> dict:
    import torch

    return torch.load(path / "last.pt", weights_only=True)["model"]


def close(one: dict, other: dict, tolerance: float = 1e-5) -> bool:
    import torch

    return one.keys() == other.keys() and all(
        torch.allclose(one[k].double(), other[k].double(), rtol=tolerance, atol=tolerance * 1e-2) for k in one)


def test_ggam_on_two_processes_trains_the_weights_of_one_and_resumes_on_one(data):
    """9 training images in batches of 6: two steps an epoch, the second of 3 images shared 2 + 1.
    On a frozen backbone (no batch statistics), 2 processes give the weights of 1 to float
    rounding, the history's figures too; a 2-process run's checkpoint resumes with 1 process to the
    weights of a 1-process run of 2 epochs."""
    frozen = ("--freeze-backbone",)
    finished(train_command(data, "one", 1, "--epochs", "2", *frozen), data)
    two = finished(train_command(data, "two", 2, "--epochs", "1", *frozen), data)
    assert "(2 processes, each its share of every batch)" in two.stderr and "error" not in two.stderr
    one_history = [json.loads(line) for line in (data / "one" / "history.jsonl").read_text().splitlines()]
    two_history = [json.loads(line) for line in (data / "two" / "history.jsonl").read_text().splitlines()]
    assert len(two_history) == 1
    for key in ("train_ce", "train_ggam", "train_accuracy", "val_accuracy", "val_ce"):
        assert two_history[0][key] == pytest.approx(one_history[0][key], rel=1e-5)
    finished(train_command(data, "two", 1, "--epochs", "2", "--resume", *frozen), data)
    assert close(weights(data / "two"), weights(data / "one"))
    assert json.loads((data / "two" / "run.json").read_text())["status"] == "finished"


def test_ggam_fine_tuned_on_two_processes_with_workers(data):
    """The whole network on 2 processes, each reading its images with a worker process: the run
    finishes, with the history of every epoch, a kept model, and one summary. (On a CPU the batch
    norms see each process's share: the weights are not one process's, so none are compared.)"""
    run = finished(train_command(data, "two", 2, "--epochs", "2", "--num-workers", "1"), data)
    history = [json.loads(line) for line in (data / "two" / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((data / "two" / "run.json").read_text())["status"] == "finished"
    assert run.stdout.count("camlens train-ggam: 2 epochs") == 1
