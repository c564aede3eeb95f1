"""The report of a ``camlens sanity`` run: every method's map at each randomisation step over
the model view, the similarity curves (inline SVG drawn from sanity.json) and the verdicts."""

from __future__ import annotations

from pathlib import Path

from ..charts import _coinciding
from ..evaluate import unquantise
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
)

KIND = "sanity"
COLORMAP = "jet"  # the colormap of sanity.png

# The similarity charts: a viewBox of WIDTH x HEIGHT user units, the plot inside the margins.
WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 58
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22")
# Each method's line: thinner and dashed in turn, so that lines that coincide (CAM and Grad-CAM on
# a pooled layer) stay visible one over the other; the chart also names them together.
DASHES = ("", "7 4", "2 3", "9 3 2 3", "1 2")
SIMILAR = 1e-3  # similarities this close at every step: the chart says that the lines coincide


def _verdict_text(v: dict, steps: int) -> str:
    from ..cli.sanity import _verdict_text as text

    try:
        return text(v, steps)
    except (KeyError, TypeError):
        return str(v.get("verdict", "?"))


def _chart(methods: list[dict], key: str, steps: list[str], low: float, high: float,
           threshold: float | None = None) -> dict:
    """The geometry of one similarity chart: per method its line segments (a blank map, None,
    breaks the line) and points; the axis ticks; the threshold line. Numbers only: the template
    draws them."""
    count = len(steps)  # the trained model (x = 0, the reference: similarity 1) and each step
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return round(LEFT + width * (i / max(count - 1, 1)), 1)

    def y(v: float) -> float:
        v = min(max(v, low), high)
        return round(TOP + height * (high - v) / (high - low), 1)

    lines = []
    for index, method in enumerate(methods):
        values = [1.0, *(number(v) for v in method[key])]
        segments, points = broken_line([None if v is None else (x(i), y(v), f"{method['display']}, {steps[i]}: {v:.3f}")
                                        for i, v in enumerate(values)])
        lines.append({"name": method["name"], "display": method["display"], "color": PALETTE[index % len(PALETTE)],
                      "segments": segments, "points": points,
                      "width": round(max(1.4, 3.6 - 0.6 * index), 1), "dash": DASHES[index % len(DASHES)],
                      "radius": round(max(2.0, 4.2 - 0.6 * index), 1)})
    # Methods blank at every step have no line beside the trained point that all share: never
    # named as coinciding.
    similarities = {m["name"]: [number(v) for v in m[key]] for m in methods}
    labels = _coinciding({name: v for name, v in similarities.items() if any(x is not None for x in v)},
                         {m["name"]: m["display"] for m in methods}, SIMILAR)
    together = list(dict.fromkeys(label for label in labels.values() if " = " in label))
    ticks = [{"y": y(v), "label": f"{v:g}"} for v in (low, (low + high) / 2, high)]
    columns = [{"x": x(i), "label": label} for i, label in enumerate(steps)]
    return {"lines": lines, "ticks": ticks, "columns": columns, "width": WIDTH, "height": HEIGHT,
            "left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": HEIGHT - BOTTOM,
            "threshold": None if threshold is None else y(threshold), "together": together}


def load(folder: Path, store: ImageStore) -> dict:
    """The template's context for the sanity run in ``folder``."""
    path = folder / "sanity.json"
    data = read_json(path, "sanity.json")
    if not isinstance(data, dict):
        raise RunError(f"{path}: not a camlens sanity.json")
    check_version(data.get("camlens"), folder, "sanity")
    status = data.get("status", "complete")
    verdicts = data.get("methods")
    steps = data.get("steps")
    if not isinstance(verdicts, dict) or not isinstance(steps, list) or not steps:
        raise RunError(f"{path}: has no methods or steps (is the run folder damaged?)")
    files = data.get("files") or {}
    if not isinstance(files, dict):
        raise RunError(f"{path}: names its files wrongly ({files!r})")
    digests = data.get("digests") if isinstance(data.get("digests"), dict) else {}
    view, maps_file = files.get("view", "view.jpg"), files.get("maps", "maps.npz")
    photo = open_photo(own_file(folder, view, path), digests.get(view))
    maps = load_npz(own_file(folder, maps_file, path), digests.get(maps_file))
    columns = ["trained", *map(str, steps)]
    notes: list[str] = []
    if status != "complete":
        planned = data.get("planned_methods") or []
        missing = [m for m in planned if m not in {v.get("display_name") for v in verdicts.values()
                                                   if isinstance(v, dict)}]
        notes.append(f"This run was {status}: the report shows the {len(verdicts)} method(s) it finished"
                     + (f"; not run: {', '.join(missing)}." if missing else "."))
    if not verdicts:
        raise RunError(f"{folder}: the run has no finished method yet")

    methods = []
    for name, v in verdicts.items():
        if not isinstance(v, dict) or len(v.get("spearman") or []) != len(steps) \
                or len(v.get("ssim") or []) != len(steps):
            raise RunError(f"{path}: {name}'s similarities do not match its {len(steps)} steps")
        if name not in maps:
            raise RunError(f"{folder / 'maps.npz'}: no maps of {name} (the folder is incomplete)")
        stack = maps[name]
        if stack.ndim != 3 or stack.shape[0] != len(columns):
            raise RunError(f"{folder / 'maps.npz'}: {name}'s maps have shape {stack.shape}, "
                           f"not one per step and the trained model's ({len(columns)})")
        methods.append({
            "name": name,
            "display": v.get("display_name") or name,
            "verdict": str(v.get("verdict", "?")),
            "verdict_text": _verdict_text(v, len(steps)),
            "similar_steps": v.get("similar_steps"),
            "changed_from": v.get("changed_from"),
            "spearman": v["spearman"],
            "ssim": v["ssim"],
            "final_spearman": number(v["spearman"][-1]),
            "final_ssim": number(v["ssim"][-1]),
            "heat": [store.heat(unquantise(stack[i]), photo.size, COLORMAP) for i in range(len(columns))],
        })
    threshold = number(data.get("threshold"))
    return {
        "kind": KIND,
        "title": f"camlens sanity: {Path(str(data.get('image', '?'))).name}",
        "status": status,
        "notes": notes,
        "image": data.get("image", "?"),
        "class_name": data.get("class_name"),
        "class_index": data.get("class"),
        "model": data.get("model"),
        "layer": data.get("target_layer"),
        "criterion": data.get("criterion", ""),
        "threshold": threshold,
        "max_similar": number(data.get("max_similar")),
        "steps": columns,
        "step_groups": data.get("step_groups") or [],
        "photo": store.photo(photo),
        "methods": methods,
        "skipped": data.get("skipped_methods") or {},
        "charts": [
            {"key": "spearman", "title": "Spearman rank correlation with the trained model's map",
             **_chart(methods, "spearman", columns, -1.0, 1.0, threshold)},
            {"key": "ssim", "title": "SSIM with the trained model's map",
             **_chart(methods, "ssim", columns, -1.0, 1.0)},
        ],
        "facts": data,
        "colormap": COLORMAP,
        "similar": SIMILAR,
    }
