"""Evaluation: every metric of one image and method from one explanation, a results file that
a run can resume from, and the summary (mean and 95% confidence interval per method and metric).

Forward passes per image and method: the method's own (its clean forward gives the prediction
and Y), one of the explanation image for Average Drop/Increase, and ``steps`` for each of
deletion and insertion (the unmodified image's step reuses Y). None is run twice; the metrics'
inputs go through the model as one stream of full batches, the way the method runs the model
(its inference copy, compiled with ``compile``). Faithfulness correlation adds 101 (its 100
subsets and the clean image's logit), random logit one explanation (for another class); the
complexity metrics and those against a mask, none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import CamlensError
from .io import Arrays, file_digest, os_reason, write_atomic  # noqa: F401 (file_digest: camlens.evaluate's API)
from .methods.base import CAMMethod
from .metrics import (
    area_under_curve,
    average_drop,
    average_increase,
    box_mask,
    class_probabilities,
    complexity,
    effective_complexity,
    energy_pointing_game,
    explanation_images,
    faithfulness_correlation,
    gaussian_blur,
    localisation_correct,
    mask_auc,
    pointing_game,
    random_logit,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparseness,
    top_k_intersection,
)
from .metrics.faithfulness import CurvePlan

FAITHFULNESS = ("drop", "increase", "deletion", "insertion")
# Quantus's faithfulness metrics beyond the paper's: forwards of perturbed inputs.
CORRELATION_RUNS = 100  # faithfulness correlation's subsets per image (Quantus's default), 224 positions each
MORE_FAITHFULNESS = ("faithfulness-correlation",)
# Against the boxes (as a mask of the positions inside them): the Score-CAM paper's three, then
# Quantus's localisation metrics.
LOCALISATION = ("energy", "pointing", "localisation", "relevance-mass", "relevance-rank", "top-k", "auc")
# Of the map alone: no forward pass.
COMPLEXITY = ("sparseness", "complexity", "effective-complexity")
# Does the map change where it should? One more explanation per image.
RANDOMISATION = ("random-logit",)
METRICS = FAITHFULNESS + MORE_FAITHFULNESS + LOCALISATION + COMPLEXITY + RANDOMISATION
# What `camlens evaluate` measures unless told: the Score-CAM paper's protocol (its box metrics
# where there are boxes); `--metric all` adds the rest.
PAPER = FAITHFULNESS + LOCALISATION[:3]
TOP_K = 1000  # top-k intersection's k (Quantus's default), at most the map's positions
TITLES = {
    "drop": "Average Drop (%)",
    "increase": "Average Increase (%)",
    "deletion": "Deletion AUC",
    "insertion": "Insertion AUC",
    "faithfulness-correlation": "Faithfulness correlation",
    "energy": "Energy pointing game",
    "pointing": "Pointing game (%)",
    "localisation": "Localisation (IoU >= 0.5, %)",
    "relevance-mass": "Relevance mass accuracy",
    "relevance-rank": "Relevance rank accuracy",
    "top-k": f"Top-{TOP_K} intersection",
    "auc": "AUC (box mask)",
    "sparseness": "Sparseness (Gini)",
    "complexity": "Complexity (entropy)",
    "effective-complexity": "Effective complexity (positions)",
    "random-logit": "Random logit (SSIM)",
}
HIGHER_IS_BETTER = {"drop": False, "increase": True, "deletion": False, "insertion": True,
                    "faithfulness-correlation": True, "energy": True, "pointing": True, "localisation": True, "relevance-mass": True,
                    "relevance-rank": True, "top-k": True, "auc": True, "sparseness": True, "complexity": False,
                    "effective-complexity": False, "random-logit": False}
# The values each metric can take: a confidence interval is never drawn beyond them. Complexity
# (up to the log of the positions) and effective complexity (up to their number) depend on the
# input's size.
RANGES = {"drop": (0.0, 100.0), "increase": (0.0, 100.0), "deletion": (0.0, 1.0), "insertion": (0.0, 1.0),
          "faithfulness-correlation": (-1.0, 1.0), "energy": (0.0, 1.0), "pointing": (0.0, 100.0), "localisation": (0.0, 100.0),
          "relevance-mass": (0.0, 1.0), "relevance-rank": (0.0, 1.0), "top-k": (0.0, 1.0), "auc": (0.0, 1.0),
          "sparseness": (0.0, 1.0), "complexity": (0.0, math.inf), "effective-complexity": (0.0, math.inf),
          "random-logit": (-1.0, 1.0)}


def evaluate_image(
    method: CAMMethod,
    image: Tensor,
    label: int,
    boxes: Sequence[Sequence[float]],
    metrics: Sequence[str],
    steps: int = 16,
    batch_size: int = 8,
    keep: dict | None = None,
    seed: int = 0,
) -> dict:
    """All requested metrics for one preprocessed image (C, H, W) and its label, explained for
    the label's class. ``boxes`` are in model-input pixels; box metrics are skipped without them.

    ``seed`` draws random logit's other class (the caller gives each image its own).
    ``keep``, a dict, receives the map the metrics used: ``"map"`` (H, W) float32 NumPy array
    in [0, 1] at input resolution, and ``"layer_side"``, the longer side of its layer's maps.
    """
    x = image.unsqueeze(0)
    explanation = method(x, label)
    maps = explanation.maps[:, 0]
    if keep is not None:
        keep["map"] = maps[0].detach().float().cpu().numpy()
        keep["layer_side"] = max((max(raw.shape[-2:]) for raw in explanation.raw.values()), default=None)
    classes = torch.tensor([label], device=x.device)
    probability = explanation.probabilities[:, 0]
    record: dict = {
        "prediction": int(explanation.logits.argmax(dim=1)[0]),
        "probability": float(probability[0]),
        # A blank map (zero everywhere) still gets the metrics of a map that ranks no pixel above
        # another: said, so that a mean over such maps is not taken for a method's merit.
        "blank": bool(explanation.blank[0, 0]),
    }
    wanted = [name for name in ("deletion", "insertion") if name in metrics]
    if "drop" in metrics or "increase" in metrics:
        wanted.append("drop")
    if wanted:
        results = _faithfulness(method, x, maps, classes, probability, wanted, steps, batch_size)
        if "drop" in results:
            record["explained_probability"] = float(results["drop"][0])
            for name in ("drop", "increase"):
                if name in metrics:
                    value = (average_drop if name == "drop" else average_increase)(probability, results["drop"])
                    record[name] = float(value[0])
        for name in ("deletion", "insertion"):
            if name in results:
                curve = results[name]
                record[name] = float(area_under_curve(curve)[0])
                record[f"{name}_curve"] = [round(float(v), 6) for v in curve[0]]
    if "faithfulness-correlation" in metrics:
        # 100 subsets of 224 input values (fewer on a small input), the same for every image of a size (seed 0).
        size = min(224, x[0].numel() // 2)
        record["faithfulness-correlation"] = float(faithfulness_correlation(
            method.fast_forward(x, batch_size), x, maps, classes, CORRELATION_RUNS, size, batch_size=batch_size)[0])
    if "random-logit" in metrics:
        record["random-logit"] = float(random_logit(method, x, classes, seed, explanation)[0])
    for name, measure in (("sparseness", sparseness), ("complexity", complexity),
                          ("effective-complexity", effective_complexity)):
        if name in metrics:
            record[name] = float(measure(maps)[0])
    if boxes:
        height, width = maps.shape[-2:]
        mask = box_mask(boxes, height, width, device=maps.device)[None]
        if "energy" in metrics:
            record["energy"] = float(energy_pointing_game(maps, mask)[0])
        for name, measure in (("relevance-mass", relevance_mass_accuracy), ("relevance-rank", relevance_rank_accuracy),
                              ("auc", mask_auc)):
            if name in metrics:
                record[name] = float(measure(maps, mask)[0])
        if "top-k" in metrics:
            record["top-k"] = float(top_k_intersection(maps, mask, min(TOP_K, height * width))[0])
        if "pointing" in metrics:
            record["pointing"] = 100.0 * float(pointing_game(maps, [boxes])[0])
        if "localisation" in metrics:
            iou, correct = localisation_correct(maps, [boxes])
            record["iou"] = float(iou[0])
            record["localisation"] = 100.0 * float(correct[0])
    return record


def _faithfulness(
    method: CAMMethod, x: Tensor, maps: Tensor, classes: Tensor, probability: Tensor,
    wanted: Sequence[str], steps: int, batch_size: int,
) -> dict[str, Tensor]:
    """The explanation image's probability O (``"drop"``) and the deletion and insertion curves.

    Their perturbed inputs form one stream, built and forwarded ``batch_size`` rows at a time
    (so no batch holds one metric's leftovers alone, and memory does not grow with ``steps``),
    the way the method runs the model (its inference copy with ``optimize``)."""
    plans: dict[str, CurvePlan] = {}
    if "deletion" in wanted:
        plans["deletion"] = CurvePlan(x, maps, classes, x, torch.zeros_like(x), steps, (0, probability))
    if "insertion" in wanted:
        plans["insertion"] = CurvePlan(x, maps, classes, gaussian_blur(x), x, steps, (steps, probability))
    # Rows of the stream: (source, its row count, the builder of some of its rows).
    sources: list[tuple[str, int, object]] = []
    if "drop" in wanted:
        sources.append(("drop", 1, lambda index: explanation_images(x, maps)))
    sources += [(name, plan.rows.numel(), plan.inputs) for name, plan in plans.items()]
    total = sum(count for _, count, _ in sources)
    found = x.new_empty(total)
    scorer = method.fast_forward(x, batch_size)  # class_probabilities puts it in eval mode
    for begin in range(0, total, batch_size):
        end, parts, offset = min(begin + batch_size, total), [], 0
        for _, count, build in sources:  # the rows of each source that fall in [begin, end)
            low, high = max(begin, offset), min(end, offset + count)
            if low < high:
                parts.append(build(torch.arange(low - offset, high - offset, device=x.device)))
            offset += count
        inputs = torch.cat(parts)
        found[begin:end] = class_probabilities(scorer, inputs, classes.expand(inputs.shape[0]), batch_size)
    results, offset = {}, 0
    for name, count, _ in sources:
        if name == "drop":
            results[name] = found[:1]
        else:
            plans[name].fill(torch.arange(count, device=x.device), found[offset : offset + count])
            results[name] = plans[name].curves
        offset += count
    return results


class ResultStore:
    """Results as JSON lines, one per (image, method), appended and flushed as they come.

    A run that stops (Ctrl-C, a crash, a power cut) resumes from the records on disk, and an
    (image, method) pair is never counted twice. ``config`` holds every setting that can change
    a result; it must equal the one the folder was started with, else the store refuses, naming
    what changed. A line that is damaged (cut short, not JSON, not a record with this run's
    fields) or foreign (an image not in ``images``, a method not in the config, a second record
    of a pair) is moved to ``results.set-aside.jsonl`` and described in ``set_aside``: a damaged
    line's pair is computed again if the run needs it, and of two records of a pair the first is
    kept.

    A run of several processes (``torchrun``, :mod:`camlens.distributed`): rank 0 holds the store
    as above; rank r > 0 (``rank``) reads the results rank 0 checked and appends its own to
    ``results.rank<r>.jsonl``, which rank 0 moves into ``results.jsonl`` at the end
    (:meth:`merge`), and at the start of the next run where a run was killed before: under the
    same rules, line by line, so nothing is lost and no pair counted twice.
    """

    def __init__(self, folder: Path, config: dict, images: Collection[str], rank: int = 0) -> None:
        self.main_path = folder / "results.jsonl"
        self.path = self.main_path if rank == 0 else folder / shard_name(rank)
        self.config_path = folder / "config.json"
        self.aside_path = folder / "results.set-aside.jsonl"
        self.config = json.loads(json.dumps(config))  # as it reads back from the file
        self.folder = folder
        self.records: dict[tuple[str, str], dict] = {}
        self.set_aside: list[str] = []
        self._views: set[str] = set()
        self._mapped: dict[tuple[str, int], set[str]] = {}  # (sha256, label) -> methods with a record
        self._open_maps: tuple[Path, dict[str, np.ndarray]] | None = None
        self._images = set(images)
        if rank != 0:  # rank 0 has checked the folder and merged what earlier runs left
            self._read_checked()
            return
        shards = shard_files(folder)
        for path in (self.path, self.config_path, *shards):
            if path.exists() and not path.is_file():
                raise CamlensError(f"{path} is not a regular file: use another --out")
        for name in (VIEWS, MAPS):
            if (folder / name).exists() and not (folder / name).is_dir():
                raise CamlensError(f"{folder / name} is not a folder: use another --out")
            for leftover in (folder / name).glob(".camlens-partial-*"):  # of a run killed while writing
                leftover.unlink(missing_ok=True)
        if not any(path.is_file() and path.stat().st_size for path in (self.path, *shards)):
            # No results yet: nothing to mix with.
            write_atomic(self.config_path, lambda p: p.write_text(json.dumps(self.config, indent=2) + "\n"))
            for shard in shards:
                shard.unlink()
            return
        saved = self._saved_config()
        if saved != self.config:
            raise CamlensError(
                f"{folder} holds results of other settings ({config_changes(saved, self.config)}); "
                f"use another --out, or the settings recorded in {self.config_path}"
            )
        self._load(shards)

    def _saved_config(self) -> dict:
        if not self.config_path.exists():
            raise CamlensError(
                f"{self.path} has no config.json beside it, so the settings of its results are unknown; "
                "use another --out"
            )
        try:
            saved = json.loads(self.config_path.read_text(encoding="utf-8"))
        except OSError as error:
            raise CamlensError(f"cannot read {self.config_path} ({os_reason(error)})") from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            saved = None
        if not isinstance(saved, dict):
            raise CamlensError(
                f"{self.config_path} is damaged (not a JSON object), so the settings of the results beside "
                "it are unknown; use another --out, or delete that folder to start afresh"
            )
        return saved

    def _load(self, shards: list[Path]) -> None:
        """Read ``results.jsonl`` and the other processes' files after it (``shards``, in rank
        order); keep the usable records, set the rest aside, and leave the kept ones in
        ``results.jsonl`` alone."""
        kept: list[bytes] = []
        aside: list[bytes] = []
        whole = True
        for path in [self.path, *shards]:
            try:
                raw = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            except OSError as error:
                raise CamlensError(f"cannot read {path} ({os_reason(error)})") from None
            whole = whole and (not raw or raw.endswith(b"\n"))
            lines = raw.split(b"\n")
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                record = _parse(line)
                if isinstance(record, str) and number == len(lines):  # the last line, without its newline
                    record = "cut short (an interrupted run)"
                problem = record_problem(record, self.config) if isinstance(record, dict) else record
                outcome = "its result is computed again if this run needs it"
                if problem is None and record["image"] not in self._images:
                    problem = f"image {record['image']!r} is not in this dataset"
                if problem is None and (key := (record["image"], record["method"])) in self.records:
                    if path != self.path and self.records[key] == record:
                        continue  # moved into results.jsonl by a merge killed before it removed the file
                    problem, outcome = "a second result for the same image and method", "the first one is kept"
                if problem is None:
                    self._keep(record)
                    kept.append(line)
                else:
                    aside.append(line)
                    self.set_aside.append(f"{path.name} line {number}: {problem}; "
                                          f"set aside in {self.aside_path.name}, {outcome}")
        if aside or shards or not whole:
            if aside:
                with self.aside_path.open("ab") as handle:
                    handle.write(b"".join(line + b"\n" for line in aside))
                    handle.flush()
                    os.fsync(handle.fileno())
            write_atomic(self.path, lambda p: p.write_bytes(b"".join(line + b"\n" for line in kept)))
            for shard in shards:  # only once their lines are in results.jsonl
                shard.unlink()

    def _read_checked(self) -> None:
        """The records of ``results.jsonl`` as rank 0 left it (checked, nothing to set aside)."""
        try:
            raw = self.main_path.read_bytes() if self.main_path.is_file() else b""
        except OSError as error:
            raise CamlensError(f"cannot read {self.main_path} ({os_reason(error)})") from None
        for line in raw.splitlines():
            record = _parse(line)
            if isinstance(record, dict) and record_problem(record, self.config) is None:
                self._keep(record)

    def _keep(self, record: dict) -> None:
        self.records[(record["image"], record["method"])] = record
        self._mapped.setdefault((record["sha256"], record["label"]), set()).add(record["method"])

    def merge(self) -> None:
        """Rank 0, once every process has finished: their results moved into ``results.jsonl``
        and read with this process's own (:attr:`records` then holds the whole run's). A run of
        one process has nothing to merge: its records are already the whole run's."""
        shards = shard_files(self.folder)
        if not shards:
            return
        self.records.clear()
        self._mapped.clear()
        self._load(shards)

    def done(self, image: str, method: str) -> bool:
        return (image, method) in self.records

    def add(self, record: dict, view: Image.Image | None = None, saliency: dict | None = None) -> None:
        """Append ``record``; first, with ``view`` (the model's view of the image) and
        ``saliency`` (``evaluate_image``'s ``keep``), the image's view and the record's map, so
        that every result line has its map on disk (a run killed in between leaves a map
        without its line, computed again next time, never a line whose map is another's)."""
        key = (record["image"], record["method"])
        if key in self.records:
            return
        if view is not None:
            self._save_view(record["sha256"], view)
        if saliency is not None:
            self._save_map(record, saliency)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._keep(record)

    def _folder(self, name: str) -> Path:
        folder = self.folder / name
        try:
            folder.mkdir(exist_ok=True)
        except OSError as error:
            raise CamlensError(f"cannot make {folder}: {os_reason(error)}") from None
        return folder

    def _save_view(self, sha256: str, view: Image.Image) -> None:
        name = view_name(sha256)
        if name is None or name in self._views:
            return
        self._folder(VIEWS)
        # Written again by each run that evaluates the image: one left by a run of other settings
        # (another crop) never stands for this run's.
        write_atomic(self.folder / name, lambda p: view.convert("RGB").save(p, format="JPEG", quality=VIEW_QUALITY))
        self._views.add(name)

    def _save_map(self, record: dict, saliency: dict) -> None:
        name = maps_name(record["sha256"], record["label"])
        if name is None:
            return
        path = self.folder / name
        if self._open_maps is None or self._open_maps[0] != path:
            # Of a file left by an earlier run, only the maps of pairs this store holds stay.
            kept = self._mapped.get((record["sha256"], record["label"]), set())
            earlier = read_maps(path) if kept and path.is_file() else {}
            arrays = {k: v for k, v in earlier.items() if k.split("/")[0] in kept}
            self._open_maps = (path, arrays)
        arrays = self._open_maps[1]
        method = record["method"]
        arrays[method] = quantise(shrink(saliency["map"], saliency.get("layer_side")))
        arrays[f"{method}/layer_side"] = np.array(saliency.get("layer_side") or 0, dtype=np.int32)
        self._folder(MAPS)
        write_atomic(path, lambda p: np.savez_compressed(p, **arrays))


_SHARD = re.compile(r"results\.rank([1-9][0-9]{0,5})\.jsonl")


def shard_name(rank: int) -> str:
    """The results file of process ``rank`` > 0 of a run of several (``results.rank<r>.jsonl``)."""
    return f"results.rank{rank}.jsonl"


def shard_files(folder: Path) -> list[Path]:
    """The results files of the other processes of a run of several in ``folder``, by rank: what
    a run killed before rank 0 merged them left (:meth:`ResultStore.merge`)."""
    found = [(int(m.group(1)), path) for path in folder.glob("results.rank*.jsonl")
             if (m := _SHARD.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


VIEWS, MAPS = "views", "maps"
VIEW_QUALITY = 88
MAP_SIDE = 112  # pixels of the longer side of a saved map of a coarse layer (see shrink)
_HEX = re.compile(r"sha256:([0-9a-f]{64})")


def _stem(sha256: object) -> str | None:
    found = _HEX.fullmatch(sha256) if isinstance(sha256, str) else None
    return found.group(1) if found else None


def view_name(sha256: object) -> str | None:
    """Where a run keeps the model's view of an image, by its content ("views/<hex>.jpg")."""
    stem = _stem(sha256)
    return None if stem is None else f"{VIEWS}/{stem}.jpg"


def maps_name(sha256: object, label: object) -> str | None:
    """Where a run keeps each method's map of an image explained for ``label``, by content and
    label ("maps/<hex>-<label>.npz"): images of the same content share it, and a resumed run
    adds to it."""
    stem = _stem(sha256)
    if stem is None or not isinstance(label, int) or isinstance(label, bool):
        return None
    return f"{MAPS}/{stem}-{label}.npz"


def shrink(saliency: np.ndarray, layer_side: int | None) -> np.ndarray:
    """A map at input resolution downscaled to what it holds: a map upsampled from a 7 x 7 layer
    is as sharp at MAP_SIDE pixels, so it is kept at that (a fine layer keeps 8 pixels per cell,
    up to the input's resolution)."""
    saliency = np.nan_to_num(np.asarray(saliency, dtype=np.float32), nan=0.0)
    height, width = saliency.shape
    side = max(MAP_SIDE, 8 * (layer_side or 0))
    scale = side / max(height, width)
    if scale >= 1:
        return saliency
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(saliency, mode="F").resize(size, Image.Resampling.BILINEAR))


def quantise(saliency: np.ndarray) -> np.ndarray:
    """A map in [0, 1] as uint8 (0 to 255); not-a-number is 0."""
    values = np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return np.round(values * 255.0).astype(np.uint8)


def unquantise(saved: np.ndarray) -> np.ndarray:
    """A saved map back in [0, 1] as float32: 8-bit (:func:`quantise`) or a float array (as
    camlens 0.3.0 saved sanity maps before it saved them 8-bit)."""
    values = np.asarray(saved)
    return values.astype(np.float32) / 255.0 if values.dtype == np.uint8 else values.astype(np.float32)


def read_maps(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a maps file, or {} when it cannot be read (its records then show no map)."""
    try:
        arrays = Arrays(path)
        return {key: arrays[key] for key in arrays}
    except CamlensError:  # damaged, a link, or larger than camlens writes
        return {}


def _parse(line: bytes) -> dict | str:
    """A line of results.jsonl as a dict, or what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "not JSON"
    return record if isinstance(record, dict) else f"a JSON {type(record).__name__}, not a record"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: dict, config: dict) -> str | None:
    """What makes ``record`` unusable in a run of ``config`` (a field missing or of the wrong
    type, a method of another run), or None."""
    if not isinstance(record.get("image"), str):
        return "no image name"
    if record.get("method") not in config["--method"]:
        return f"method {record.get('method')!r} is not in this run"
    fields = {"label": int, "prediction": int, "sha256": str, "boxes": list, "probability": float, "seconds": float}
    for metric in config["--metric"]:
        if metric in FAITHFULNESS:
            fields[metric] = float
    for name, kind in fields.items():
        value = record.get(name)
        ok = _number(value) if kind is float else isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            return f"field {name!r} is missing or not a{'n' if kind is int else ''} {'number' if kind is float else kind.__name__}"
    if "blank" in record and not isinstance(record["blank"], bool):
        return "field 'blank' is not true or false"
    for name in ("label", "prediction"):
        if not 0 <= record[name] < 2**31:
            return f"field {name!r} is not a class index ({_shown_number(record[name])})"
    if not all(isinstance(b, list) and len(b) == 4 and all(map(_finite, b)) for b in record["boxes"]):
        return "field 'boxes' is not a list of boxes"
    if not _finite(record["seconds"]) or record["seconds"] < 0:
        return f"field 'seconds' is not a duration ({_shown_number(record['seconds'])})"
    for name, (low, high) in {"probability": (0.0, 1.0), **RANGES}.items():
        if name not in record:
            continue
        if not _number(record[name]):
            return f"field {name!r} is not a number"
        # NaN is a metric's own answer where it is undefined (a class probability of 0): kept,
        # and left out of the means. Anything else outside the metric's values is damage.
        if not (_undefined(record[name]) and name != "probability") and not _within(record[name], low, high):
            return f"field {name!r} is {_shown_number(record[name])}, outside its range [{low:g}, {high:g}]"
    for kind in ("deletion", "insertion"):
        curve = record.get(f"{kind}_curve")
        if kind in config["--metric"] and not (
            isinstance(curve, list) and len(curve) == config["--steps"] + 1 and all(map(_number, curve))
        ):
            return f"field '{kind}_curve' is missing or not {config['--steps'] + 1} numbers"
        if kind in config["--metric"] and not all(_undefined(v) or _within(v, 0.0, 1.0) for v in curve):
            return f"field '{kind}_curve' holds values that are not probabilities (outside [0, 1])"
    return None


# Rounding a value of a metric's range must be kept; 1e-9 is far above float64's error and far
# below anything a damaged line would hold.
_SLACK = 1e-9


def _finite(value: object) -> bool:
    return _number(value) and (isinstance(value, int) or math.isfinite(value))


def _undefined(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _within(value: float, low: float, high: float) -> bool:
    """Whether ``value`` is a finite number of [low, high] (a Python int of 400 digits included,
    compared exactly, never converted)."""
    return _finite(value) and low - _SLACK <= value <= high + _SLACK


def _shown_number(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def _is_digest(value: object) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(map(_is_digest, value.values()))
    return isinstance(value, str) and value.startswith("sha256:")


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def config_changes(saved: dict, current: dict) -> str:
    """What differs between two run configs, in words: "--steps: 4 -> 8; --weights: other content"."""
    if set(saved) != set(current):
        return "config.json was written by another version of camlens"
    return "; ".join(_changes("", saved, current))


def _changes(name: str, old: object, new: object) -> list[str]:
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict) and not (_is_digest(old) or _is_digest(new)):
        return [change for key in dict.fromkeys([*old, *new])
                for change in _changes(f"{name} {key}".strip(), old.get(key), new.get(key))]
    if _is_digest(old) and _is_digest(new):
        return [f"{name}: other content"]
    if _is_digest(old) or _is_digest(new):
        return [f"{name}: {'given' if _is_digest(old) else 'not given'} then, {'given' if _is_digest(new) else 'not given'} now"]
    return [f"{name}: {_shown(old)} -> {_shown(new)}"]


def module_digest(module: torch.nn.Module) -> str:
    """"sha256:<hex>" of a model's parameters and buffers: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if isinstance(tensor, Tensor):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


INTERVAL_MIN_N = 5  # below this many values an interval of the mean says nothing: none is given
BOOTSTRAP_RESAMPLES = 2000
INTERVAL = ("95% bootstrap percentile interval of the mean (2,000 resamples, fixed seed): inside the metric's "
            f"range by construction; none for n < {INTERVAL_MIN_N}, where it would mean nothing")


def mean_interval(values: Iterable[float]) -> dict:
    """Mean, 95% interval and count of the finite values: ``{"mean", "low", "high", "n"}``.

    The interval is the bootstrap percentile interval of the mean: the 2.5% and 97.5% quantiles
    of the means of :data:`BOOTSTRAP_RESAMPLES` resamples with replacement (seed 0, so that a run
    gives the same figures on any machine). Each resampled mean lies between the smallest and
    largest value, so the interval stays inside the metric's range (a percentage, an AUC in
    [0, 1]), where Student's t's mean ± half-width did not (``0.507 ± 4`` for an AUC of two
    images). Below :data:`INTERVAL_MIN_N` values, ``low`` and ``high`` are None.
    """
    data = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    count = int(data.size)
    if count == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(data.mean())
    if count < INTERVAL_MIN_N:
        return {"mean": mean, "low": None, "high": None, "n": count}
    generator = np.random.default_rng(0)
    means = np.empty(BOOTSTRAP_RESAMPLES)
    step = max(1, 2_000_000 // count)  # resamples per batch: at most 2 million values at once
    for start in range(0, BOOTSTRAP_RESAMPLES, step):
        rows = min(step, BOOTSTRAP_RESAMPLES - start)
        means[start : start + rows] = data[generator.integers(0, count, size=(rows, count))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"mean": mean, "low": float(min(low, mean)), "high": float(max(high, mean)), "n": count}


def summarise(records: Iterable[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict:
    """``{method: {metric: {"mean", "low", "high", "n"}}}`` over the records (:func:`mean_interval`),
    taken in image order: the figures do not depend on the order in which the records were written
    (by one process or several)."""
    rows = _in_image_order(records)
    return {
        method: {
            metric: mean_interval(r.get(metric) for r in rows if r["method"] == method)
            for metric in metrics
        }
        for method in methods
    }


def _in_image_order(records: Iterable[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["image"], r["method"]))


def mean_curves(records: Iterable[dict], methods: Sequence[str], key: str) -> dict[str, list[float]]:
    """The mean deletion or insertion curve of each method (``key`` = "deletion_curve", ...)."""
    curves: dict[str, list[float]] = {}
    rows = _in_image_order(records)
    for method in methods:
        found = [r[key] for r in rows if r["method"] == method and key in r]
        if found:
            curves[method] = [sum(values) / len(found) for values in zip(*found)]
    return curves
