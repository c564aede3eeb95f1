"""Evaluation: every metric of one image and method from one explanation, a results file that
a run can resume from, and the summary (mean and 95% confidence interval per method and metric).

Forward passes per image and method: the method's own (its clean forward gives the prediction
and Y), one of the explanation image for Average Drop/Increase, and ``steps`` for each of
deletion and insertion (the unmodified image's step reuses Y). None is run twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import CamlensError
from .methods.base import CAMMethod
from .metrics import (
    area_under_curve,
    box_mask,
    deletion_curve,
    drop_and_increase,
    energy_pointing_game,
    insertion_curve,
    localisation_correct,
    pointing_game,
)

FAITHFULNESS = ("drop", "increase", "deletion", "insertion")
LOCALISATION = ("energy", "pointing", "localisation")
METRICS = FAITHFULNESS + LOCALISATION
TITLES = {
    "drop": "Average Drop (%)",
    "increase": "Average Increase (%)",
    "deletion": "Deletion AUC",
    "insertion": "Insertion AUC",
    "energy": "Energy pointing game",
    "pointing": "Pointing game (%)",
    "localisation": "Localisation (IoU >= 0.5, %)",
}
HIGHER_IS_BETTER = {"drop": False, "increase": True, "deletion": False, "insertion": True,
                    "energy": True, "pointing": True, "localisation": True}


def evaluate_image(
    method: CAMMethod,
    image: Tensor,
    label: int,
    boxes: Sequence[Sequence[float]],
    metrics: Sequence[str],
    steps: int = 16,
    batch_size: int = 32,
) -> dict:
    """All requested metrics for one preprocessed image (C, H, W) and its label, explained for
    the label's class. ``boxes`` are in model-input pixels; box metrics are skipped without them.
    """
    x = image.unsqueeze(0)
    explanation = method(x, label)
    maps = explanation.maps[:, 0]
    classes = torch.tensor([label], device=x.device)
    probability = explanation.probabilities[:, 0]
    model = method.model
    record: dict = {
        "prediction": int(explanation.logits.argmax(dim=1)[0]),
        "probability": float(probability[0]),
    }
    if "drop" in metrics or "increase" in metrics:
        result = drop_and_increase(model, x, maps, classes, batch_size, probability=probability)
        record["explained_probability"] = float(result["explained_probability"][0])
        for name in ("drop", "increase"):
            if name in metrics:
                record[name] = float(result[name][0])
    if "deletion" in metrics:
        curve = deletion_curve(model, x, maps, classes, steps, batch_size=batch_size, probability=probability)
        record["deletion"] = float(area_under_curve(curve)[0])
        record["deletion_curve"] = [round(float(v), 6) for v in curve[0]]
    if "insertion" in metrics:
        curve = insertion_curve(model, x, maps, classes, steps, batch_size=batch_size, probability=probability)
        record["insertion"] = float(area_under_curve(curve)[0])
        record["insertion_curve"] = [round(float(v), 6) for v in curve[0]]
    if boxes:
        height, width = maps.shape[-2:]
        if "energy" in metrics:
            mask = box_mask(boxes, height, width, device=maps.device)[None]
            record["energy"] = float(energy_pointing_game(maps, mask)[0])
        if "pointing" in metrics:
            record["pointing"] = 100.0 * float(pointing_game(maps, [boxes])[0])
        if "localisation" in metrics:
            iou, correct = localisation_correct(maps, [boxes])
            record["iou"] = float(iou[0])
            record["localisation"] = 100.0 * float(correct[0])
    return record


class ResultStore:
    """Results as JSON lines, one per (image, method), appended and flushed as they come.

    A run that stops (Ctrl-C, a crash, a power cut) resumes from the records on disk: a
    half-written last line is dropped, and a (image, method) pair is never counted twice.
    ``config`` must match the one the store was started with, so results of different
    settings are never mixed.
    """

    def __init__(self, folder: Path, config: dict) -> None:
        self.path = folder / "results.jsonl"
        self.config_path = folder / "config.json"
        if self.config_path.exists():
            try:
                saved = json.loads(self.config_path.read_text())
            except (OSError, json.JSONDecodeError):
                saved = None
            if saved != config:
                raise CamlensError(
                    f"{folder} holds results of other settings ({self.config_path}); "
                    "use another --out, or the same model, methods, metrics and steps"
                )
        else:
            self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        self.records: dict[tuple[str, str], dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        complete = lines if text.endswith("\n") else lines[:-1]
        for line in complete:
            if line.strip():
                record = json.loads(line)
                self.records[(record["image"], record["method"])] = record
        if not text.endswith("\n"):  # a line cut short by an interruption: rewrite without it
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records.values()))

    def done(self, image: str, method: str) -> bool:
        return (image, method) in self.records

    def add(self, record: dict) -> None:
        key = (record["image"], record["method"])
        if key in self.records:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[key] = record


# Two-sided 95% quantiles of Student's t distribution by degrees of freedom (statistical table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
        26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile(freedom: int) -> float:
    """The 97.5% quantile of Student's t with ``freedom`` degrees of freedom (table, then 1.96)."""
    if freedom in _T95:
        return _T95[freedom]
    larger = [d for d in _T95 if d > freedom]
    return _T95[min(larger)] if larger else 1.960


def mean_interval(values: Iterable[float]) -> dict:
    """Mean, 95% confidence half-width (Student's t) and count of the values."""
    data = [v for v in values if v is not None and math.isfinite(v)]
    count = len(data)
    if count == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(data) / count
    if count == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    deviation = math.sqrt(sum((v - mean) ** 2 for v in data) / (count - 1))
    return {"mean": mean, "ci95": t_quantile(count - 1) * deviation / math.sqrt(count), "n": count}


def summarise(records: Iterable[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict:
    """``{method: {metric: {"mean", "ci95", "n"}}}`` over the records."""
    rows = list(records)
    return {
        method: {
            metric: mean_interval(r.get(metric) for r in rows if r["method"] == method)
            for metric in metrics
        }
        for method in methods
    }


def mean_curves(records: Iterable[dict], methods: Sequence[str], key: str) -> dict[str, list[float]]:
    """The mean deletion or insertion curve of each method (``key`` = "deletion_curve", ...)."""
    curves: dict[str, list[float]] = {}
    rows = list(records)
    for method in methods:
        found = [r[key] for r in rows if r["method"] == method and key in r]
        if found:
            curves[method] = [sum(values) / len(found) for values in zip(*found)]
    return curves
