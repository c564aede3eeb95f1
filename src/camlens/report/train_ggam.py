"""The report of a ``camlens train-ggam`` run: the training curves (inline SVG from
history.jsonl), the history table, and the kept model's Grad-CAM maps of a few validation
images (examples/, saved at the end of training)."""

from __future__ import annotations

import math
from pathlib import Path

from ..charts import _coinciding
from .common import (
    ImageStore,
    RunError,
    broken_line,
    check_version,
    load_npz,
    number,
    open_photo,
    own_file,
    read_json,
    read_jsonl,
)

KIND = "train_ggam"
COLORMAP = "jet"
WIDTH, HEIGHT = 640, 240
# Room for the axis labels at the phone's larger font (train_ggam.html.j2): 19 units of 640.
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 12, 44
SERIES = {
    "loss": (("train_ce", "train CE", "#1f77b4"), ("train_ggam", "train L_GGAM", "#ff7f0e"),
             ("val_ce", "validation CE", "#d62728")),
    "accuracy": (("train_accuracy", "train accuracy", "#1f77b4"), ("val_accuracy", "validation accuracy", "#d62728")),
}
# Each series thinner and dashed in turn, so that series that coincide stay visible one over the
# other; the caption also names them together.
DASHES = ("", "7 4", "2 3")
SAME = 1e-4  # series this close at every epoch: the caption says that they coincide


def _chart(history: list[dict], key: str, title: str, best_epoch: int | None) -> dict:
    """Numbers for the template to draw: per series its line (missing values break it) and
    points, the axis ticks, the best epoch's vertical line."""
    epochs = [int(row["epoch"]) for row in history]
    values = [v for row in history for k, _, _ in SERIES[key] if (v := number(row.get(k))) is not None]
    if key == "accuracy":
        low, high = 0.0, 1.0
    else:
        low, high = 0.0, max(values, default=1.0) or 1.0
    first, last = min(epochs), max(epochs)
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(epoch: int) -> float:
        return round(LEFT + width * ((epoch - first) / max(last - first, 1)), 1)

    def y(v: float) -> float:
        return round(TOP + height * (high - min(max(v, low), high)) / (high - low), 1)

    lines = []
    for name, label, color in SERIES[key]:
        values = [(row["epoch"], number(row.get(name))) for row in history]
        segments, points = broken_line([None if v is None else (x(e), y(v), f"{label}, epoch {e}: {v:.4g}")
                                        for e, v in values])
        index = len(lines)
        lines.append({"label": label, "color": color, "segments": segments, "points": points,
                      "width": round(max(1.4, 3.4 - 0.7 * index), 1), "dash": DASHES[index % len(DASHES)],
                      "radius": round(max(2.0, 3.8 - 0.6 * index), 1)})
    series = {label: [number(row.get(name)) for row in history] for name, label, _ in SERIES[key]}
    labels = _coinciding({label: v for label, v in series.items() if any(x is not None for x in v)}, {}, SAME)
    step = max(1, math.ceil(len(epochs) / 10))
    return {
        "key": key, "title": title, "lines": lines, "width": WIDTH, "height": HEIGHT,
        "left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": HEIGHT - BOTTOM,
        "ticks": [{"y": y(v), "label": f"{v:.3g}"} for v in (low, (low + high) / 2, high)],
        "columns": [{"x": x(e), "label": str(e)} for e in epochs[::step]],
        "best": x(best_epoch) if best_epoch in epochs else None,
        "together": list(dict.fromkeys(label for label in labels.values() if " = " in label)),
        "same": SAME,
    }


def _status(folder: Path, run: dict | None) -> str:
    state = (run or {}).get("status")
    if state == "finished":
        return "complete"
    return "interrupted"


def load(folder: Path, store: ImageStore) -> dict:
    """The template's context for the train-ggam run in ``folder``."""
    settings = read_json(folder / "train.json", "train.json")
    if not isinstance(settings, dict):
        raise RunError(f"{folder / 'train.json'}: not the settings of a train-ggam run")
    run_path = folder / "run.json"
    if not run_path.is_file():
        raise RunError(f"{folder}: no epoch of this training run finished (no run.json): nothing to report yet")
    run = read_json(run_path, "run.json")
    if not isinstance(run, dict):
        raise RunError(f"{run_path}: not a camlens run record")
    check_version(run.get("camlens version"), folder, "train-ggam")
    history_path = folder / "history.jsonl"
    if not history_path.is_file():
        raise RunError(f"{history_path}: missing (was the run folder damaged?)")
    records, bad = read_jsonl(history_path)
    history = [r for r in records if isinstance(r.get("epoch"), int)]
    if not history:
        raise RunError(f"{history_path}: no epoch recorded")
    extra = run.get("extra") if isinstance(run.get("extra"), dict) else {}
    status = _status(folder, run)
    notes: list[str] = []
    if bad:
        notes.append(f"{bad} line(s) of history.jsonl could not be read (the run was stopped while writing).")
    examples_json = folder / "examples" / "examples.json"
    examples, example_facts = [], {}
    if examples_json.is_file():
        example_facts = read_json(examples_json, "examples.json")
        if not isinstance(example_facts, dict) or not isinstance(example_facts.get("images"), list):
            raise RunError(f"{examples_json}: not a list of example images")
        maps = load_npz(own_file(folder / "examples", example_facts.get("maps", "maps.npz"), examples_json))
        stack = maps.get("maps")
        images = example_facts["images"]
        if stack is None or stack.ndim != 4 or stack.shape[0] != len(images):
            raise RunError(f"{folder / 'examples' / 'maps.npz'}: its maps do not match examples.json's "
                           f"{len(images)} images")
        for n, record in enumerate(images):
            view = str(record.get("view", ""))
            if not view or "/" in view or view.startswith("."):
                raise RunError(f"{examples_json}: an example names no valid view ({view!r})")
            photo = open_photo(folder / "examples" / view)
            examples.append({
                **record,
                "name": "/".join(Path(str(record.get("input", view))).parts[-2:]),
                "blank": [bool(not (stack[n, k] > 0).any()) for k in range(stack.shape[1])],
                "correct": record.get("label") == record.get("predicted"),
                "photo": store.photo(photo),
                "heat": [store.heat(stack[n, k].astype("float32"), photo.size, COLORMAP)
                         for k in range(stack.shape[1])],
            })
    if status != "complete":
        notes.insert(0, f"This training run did not finish (status {run.get('status', '?')!r}): the report shows "
                        f"its {len(history)} epoch(s) of {extra.get('epochs', '?')}; "
                        "continue it with the same command and --resume.")
    elif not examples:
        status = "interrupted"
        notes.insert(0, "The run stopped before it saved its example maps: the report shows its curves only.")
    best_epoch = extra.get("best epoch") if isinstance(extra.get("best epoch"), int) else None
    localisation = None
    if (folder / "localisation.json").is_file():
        localisation = read_json(folder / "localisation.json", "localisation.json")
    return {
        "kind": KIND,
        "title": f"camlens train-ggam: {len(history)} epoch{'s' if len(history) != 1 else ''}",
        "status": status,
        "notes": notes,
        "settings": settings,
        "run": run,
        "history": history,
        "best_epoch": best_epoch,
        "keep": settings.get("keep", "best"),
        "best_accuracy": number(extra.get("best val accuracy")),
        "charts": [_chart(history, "loss", "Losses per epoch", best_epoch),
                   _chart(history, "accuracy", "Accuracy per epoch", best_epoch)],
        "examples": examples,
        "example_facts": {k: v for k, v in example_facts.items() if k != "images"},
        "localisation": localisation if isinstance(localisation, dict) else None,
        "colormap": COLORMAP,
    }
