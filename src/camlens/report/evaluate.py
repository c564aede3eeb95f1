"""The report of a ``camlens evaluate`` run: the summary table, the mean deletion and insertion
curves (inline SVG drawn from results.jsonl), and a per-image drill-down (a sortable table of one
method's values; for a chosen image its view, every method's map over it, its values and curves).

The table is always computed from results.jsonl with the function the command uses
(``camlens.evaluate.summarise``), so an interrupted run (summary.json missing, or written before
results.jsonl last grew) is reported with the images it has, and said to be interrupted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..charts import CURVE_TOLERANCE, _coinciding
from ..evaluate import (
    HIGHER_IS_BETTER,
    RANGES,
    TITLES,
    maps_name,
    mean_curves,
    mean_interval,
    record_problem,
    shard_files,
    summarise,
    unquantise,
    view_name,
)
from ..methods import METHODS
from ..render import DEFAULT_COLORMAP
from .common import (
    ImageStore,
    RunError,
    check_version,
    load_npz,
    number,
    open_photo,
    read_json,
    read_jsonl,
)

KIND = "evaluate"
CURVE_POINTS = 65  # points of a curve kept for drawing (a curve of more steps is sampled)
# Matplotlib's tab10, the colours of curves.png.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
DASHES = ("", "7 4", "2 3", "9 3 2 3", "1 2")
# The mean-curve charts: viewBox size and plot area.
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 360, 230, 46, 10, 12, 40


def display_name(method: str) -> str:
    return METHODS[method].display_name if method in METHODS else method


def _finite(value: object) -> float | None:
    """A finite number of results.jsonl to 6 significant digits (all a page shows), else None."""
    value = number(value)
    return None if value is None else float(f"{value:.6g}")


def _config(folder: Path) -> dict:
    config = read_json(folder / "config.json", "run config")
    if not isinstance(config, dict):
        raise RunError(f"{folder / 'config.json'}: not a camlens evaluate config")
    check_version(config.get("camlens version"), folder, "evaluate")
    methods, metrics, steps = config.get("--method"), config.get("--metric"), config.get("--steps")
    if not (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods)
            and isinstance(metrics, list) and all(m in TITLES for m in metrics)
            and isinstance(steps, int) and steps >= 1):
        raise RunError(f"{folder / 'config.json'}: not a camlens evaluate config (its --method, --metric or "
                       "--steps is missing or damaged)")
    return config


def _class_names(folder: Path, notes: list[str]) -> list[str] | None:
    """The model's class names that the run kept in classes.json, or None (a model without names,
    or a run of an older camlens); a damaged file is noted and left out."""
    path = folder / "classes.json"
    if not path.is_file():
        return None
    try:
        names = read_json(path, "list of class names")
    except RunError as error:
        notes.append(f"{error}: classes are shown by index.")
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        notes.append(f"{path}: not a list of class names: classes are shown by index.")
        return None
    return names


def _status(folder: Path, images: int) -> tuple[str, list[str], dict]:
    """complete or interrupted, the notes that say so, and summary.json (when it is current)."""
    results = folder / "results.jsonl"
    path = folder / "summary.json"
    if not path.is_file():
        return "interrupted", [f"This run was interrupted before it wrote summary.json: the report shows the "
                               f"{images} image(s) in results.jsonl, and computes the table from them."], {}
    summary = read_json(path, "run summary")
    if not isinstance(summary, dict):
        raise RunError(f"{path}: not a camlens evaluate summary")
    size = summary.get("results.jsonl bytes")
    if isinstance(size, int) and not isinstance(size, bool):
        stale = size != results.stat().st_size
    else:
        stale = path.stat().st_mtime_ns < results.stat().st_mtime_ns
    if stale:
        return "interrupted", [f"This run was interrupted: results.jsonl grew after summary.json was written. "
                               f"The report shows the {images} image(s) in results.jsonl, and computes the table "
                               "from them."], {}
    return "complete", [], summary


def _sampled(steps: int) -> list[int]:
    """The steps of a curve that are drawn: all, or CURVE_POINTS of them evenly spread."""
    if steps + 1 <= CURVE_POINTS:
        return list(range(steps + 1))
    return sorted({round(i * steps / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)})


def _chart(kind: str, curves: dict[str, list[float]], names: dict[str, str], colours: dict[str, str],
           indices: list[int], steps: int, aucs: dict[str, float | None]) -> dict:
    """An SVG chart of the mean curves: one polyline per group of methods whose curves coincide."""
    labels = _coinciding(curves, names, CURVE_TOLERANCE)
    top = max((max(v) for v in curves.values()), default=0.0)
    ymax = min(1.0, math.ceil(top * 1.1 * 10) / 10) if top > 0 else 1.0
    ymax = max(ymax, 0.1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    lines, drawn = [], []
    for method, values in curves.items():
        if labels[method] in drawn:
            continue
        drawn.append(labels[method])
        index = len(drawn) - 1
        points = " ".join(f"{LEFT + plot_w * i / steps:.1f},{TOP + plot_h * (1 - min(values[i], ymax) / ymax):.1f}"
                          for i in indices)
        lines.append({"method": method, "label": labels[method], "points": points, "colour": colours[method],
                      "dash": DASHES[index % len(DASHES)], "width": max(1.6, 3.2 - 0.6 * index),
                      "auc": aucs.get(method)})
    yticks = [{"y": TOP + plot_h * (1 - v / ymax), "label": f"{v:g}"} for v in (0.0, ymax / 2, ymax)]
    xticks = [{"x": LEFT + plot_w * v, "label": f"{v:g}"} for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return {"kind": kind, "lines": lines, "xticks": xticks, "yticks": yticks,
            "better": "lower" if kind == "deletion" else "higher",
            "xlabel": "fraction of pixels " + ("deleted" if kind == "deletion" else "inserted"),
            "width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP,
            "bottom": HEIGHT - BOTTOM, "shared": any(" = " in label for label in drawn)}


def load(folder: Path, store: ImageStore) -> dict:
    """The template's context for the evaluate run in ``folder``."""
    config = _config(folder)
    methods: list[str] = list(dict.fromkeys(config["--method"]))
    metrics: list[str] = list(config["--metric"])
    steps: int = config["--steps"]
    results_path = folder / "results.jsonl"
    if not results_path.is_file():
        raise RunError(f"{folder}: no results.jsonl: the run has no results yet (run `camlens evaluate` again)")
    rows, bad = read_jsonl(results_path)
    shards = shard_files(folder)  # of a run of several processes killed before it merged them
    for shard in shards:
        more, unread = read_jsonl(shard)
        rows, bad = rows + more, bad + unread
    records: dict[tuple[str, str], dict] = {}
    unusable = 0
    for row in rows:
        if record_problem(row, config) is not None or (row["image"], row["method"]) in records:
            unusable += 1
            continue
        records[(row["image"], row["method"])] = row
    if not records:
        raise RunError(f"{folder}: the run has no results yet (results.jsonl holds no result of this run)")
    order = list(dict.fromkeys(image for image, _ in records))
    status, notes, summary = _status(folder, len(order))
    if shards:
        notes.append(f"The results of {len(shards)} other process(es) of a run of several, killed before they were "
                     "moved into results.jsonl (results.rank*.jsonl), are shown too; the next run moves them.")
    chosen = summary.get("summarised images")
    if isinstance(chosen, list) and len(set(chosen)) < len(order):
        # The images summary.json summarised (a --limit takes some of the results): the report
        # shows the same selection, so that its table and summary.json agree.
        chosen = set(chosen)
        records = {key: r for key, r in records.items() if key[0] in chosen}
        notes.append(f"results.jsonl holds {len(order)} images; the last run summarised {len(chosen)} of them (its "
                     f"--limit), and so does this report, as summary.json does.")
        order = [image for image in order if image in chosen]
        if not records:
            raise RunError(f"{folder}: summary.json summarised no image of results.jsonl (damaged?)")
    if bad or unusable:
        notes.append(f"{bad + unusable} line(s) of results.jsonl could not be used (damaged, or not of this "
                     "run's settings) and are left out.")

    names = {m: display_name(m) for m in methods}
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    values = list(records.values())
    table = summarise(values, methods, metrics)
    seconds = {m: mean_interval(r["seconds"] for r in values if r["method"] == m)["mean"] for m in methods}
    # The best mean of each metric, and the methods within 0.1% of the metric's range of it (CAM
    # and Grad-CAM differ in the last digits only); none when all methods are that close.
    best: dict[str, list[str]] = {}
    for metric in metrics:
        means = {m: table[m][metric]["mean"] for m in methods if table[m][metric]["mean"] is not None}
        span = RANGES[metric][1] - RANGES[metric][0]
        # A metric without a fixed range (complexity grows with the input's size): 0.1% of its largest mean.
        tolerance = 1e-3 * (span if math.isfinite(span) else max(map(abs, means.values()), default=0.0))
        if len(means) > 1 and max(means.values()) - min(means.values()) > tolerance:
            top = max(means.values()) if HIGHER_IS_BETTER[metric] else min(means.values())
            best[metric] = [m for m, v in means.items() if abs(v - top) <= tolerance]

    indices = _sampled(steps)
    charts = []
    for kind in ("deletion", "insertion"):
        if kind in metrics:
            curves = mean_curves(values, methods, f"{kind}_curve")
            aucs = {m: table[m][kind]["mean"] for m in methods}
            if curves:
                charts.append(_chart(kind, curves, names, colours, indices, steps, aucs))

    class_names = _class_names(folder, notes)
    used = {r.get("label") for r in values} | {r.get("prediction") for r in values}
    classes = {str(i): class_names[i] for i in sorted(i for i in used if isinstance(i, int) and not isinstance(i, bool))
               if class_names is not None and 0 <= i < len(class_names) and class_names[i].strip()}

    images, no_view, no_maps, arrays = [], 0, 0, 0
    for key in order:
        image, view_missing, maps_missing = _image(folder, key, methods, metrics, records, indices, store)
        images.append(image)
        if image["kind"] is not None:  # a signal, volume or clip: no view, no map drawn here
            arrays += 1
            continue
        no_view += view_missing
        no_maps += maps_missing
    if arrays:
        notes.append(f"{arrays} input(s) are arrays (signals, volumes or clips): shown with their values and curves, "
                     "without a picture or map (camlens explain draws their figures).")
    if no_view:
        notes.append(f"{no_view} image(s) have no saved view (views/ is missing it: a run of an older camlens, or "
                     "the file was deleted); they are shown without their picture.")
    if no_maps:
        notes.append(f"{no_maps} image(s) have no saved maps for some method (maps/ is missing them: a run of an "
                     "older camlens, or the file was deleted); those are shown without a map.")

    run_notes = [str(n) for n in summary.get("notes", []) if isinstance(n, str)]
    run_notes += [f"skipped: {s}" for s in summary.get("skipped", []) if isinstance(s, str)]
    start_up = summary.get("start-up seconds")
    if isinstance(start_up, dict):
        from ..cli.common import describe_start_up

        said = describe_start_up({str(k): float(v) for k, v in start_up.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
        if said:
            run_notes.append(said)
    return {
        "kind": KIND,
        "title": f"camlens evaluate: {len(order)} image{'s' if len(order) != 1 else ''}, "
                 f"{len(methods)} method{'s' if len(methods) != 1 else ''}",
        "status": status,
        "notes": notes,
        "run_notes": run_notes,
        "methods": [{"name": m, "display": names[m], "colour": colours[m]} for m in methods],
        "metrics": [{"name": k, "title": TITLES[k], "higher": HIGHER_IS_BETTER[k]} for k in metrics],
        "table": table,
        "best": best,
        "counts": {k: "/".join(str(n) for n in sorted({table[m][k]["n"] for m in methods})) for k in metrics},
        "seconds": seconds,
        "charts": charts,
        "images": images,
        "classes": classes,
        "x": [round(i / steps, 5) for i in indices],
        "config": config,
        "model": config.get("--model"),
        "layer": config.get("--target-layer"),
        "steps": steps,
        "colormap": DEFAULT_COLORMAP,
    }


def _image(folder: Path, key: str, methods: list[str], metrics: list[str], records: dict, indices: list[int],
           store: ImageStore) -> tuple[dict, bool, bool]:
    """One image of the drill-down, and whether its view and some of its maps are missing."""
    found = {m: records[(key, m)] for m in methods if (key, m) in records}
    first = next(iter(found.values()))
    sha256, label = first["sha256"], first["label"]
    photo = None
    view = view_name(sha256)
    if view is not None and (folder / view).is_file():
        photo = open_photo(folder / view)
    arrays: Mapping[str, np.ndarray] = {}
    maps = maps_name(sha256, label)
    if maps is not None and (folder / maps).is_file():
        arrays = load_npz(folder / maps)
    heat: dict[str, str | None] = {}
    for method in methods:
        data = arrays.get(method)
        if method not in found or data is None or data.ndim != 2:
            heat[method] = None
            continue
        side = arrays.get(f"{method}/layer_side")
        layer_side = int(side) if side is not None and side.size == 1 and int(side) > 0 else None
        shape = photo.size if photo is not None else (data.shape[1], data.shape[0])
        saliency = unquantise(data)
        heat[method] = store.heat(saliency, shape, DEFAULT_COLORMAP, layer_side)
    values, curves = {}, {}
    for method, record in found.items():
        values[method] = {k: _finite(record.get(k)) for k in (*metrics, "probability")}
        values[method]["prediction"] = record.get("prediction")
        curves[method] = {kind: [_finite(record[f"{kind}_curve"][i]) for i in indices]
                          for kind in ("deletion", "insertion") if f"{kind}_curve" in record}
    kind = first.get("kind")
    item = {
        "name": key,
        "kind": kind if kind in ("signal", "image", "volume", "clip") else None,
        "label": label,
        "photo": store.photo(photo) if photo is not None else None,
        "heat": heat,
        "values": values,
        "curves": curves,
    }
    return item, photo is None, any(heat[m] is None for m in found)
