"""The report of a ``camlens explain`` run: per image, the photo and every method's map."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..cli.common import MARKER
from ..methods import METHODS
from ..render import draw_relative_box, input_figure
from .common import (
    HEAT_QUALITY,
    ImageStore,
    RunError,
    check_version,
    colour_bar,
    heat_image,
    heat_side,
    load_npz,
    number,
    open_photo,
    read_json,
)

KIND = "explain"


def display_name(method: str) -> str:
    return METHODS[method].display_name if method in METHODS else method


def _list(value: object) -> list:
    """A list field of the manifest; anything else (null, a damaged value) is no items."""
    return value if isinstance(value, list) else []


def _named(entry: dict) -> dict:
    """A class entry (name, probability) as the page shows it, whatever the manifest holds."""
    return {**entry, "name": str(entry.get("name", "?")), "probability": number(entry.get("probability"))}


def _markers(folder: Path) -> list[dict]:
    """The image records that the markers of the run's image folders hold, each with its folder
    and run (a damaged marker, or one reached through a link, is no record)."""
    records = []
    for marker in sorted(folder.glob(f"*/{MARKER}")):
        try:
            record = read_json(marker, "image folder marker")
            records.append({**record["image"], "output": marker.parent.name, "run": record["run"]})
        except (RunError, KeyError, TypeError):
            continue
    return [r for r in records if isinstance(r.get("run"), dict)]


def _run_id(record: dict) -> object:
    return record["run"].get("id")


def load(folder: Path, store: ImageStore) -> dict:
    """The template's context for the explain run in ``folder``: the run of its manifest (the last
    one that finished, or was stopped by Ctrl-C), with the image folders that are still that
    run's; else, when a run was killed before it wrote a manifest, the newest run's folders."""
    manifest_path = folder / "manifest.json"
    notes: list[str] = []
    found = _markers(folder)
    if manifest_path.is_file() or manifest_path.is_symlink():
        manifest = read_json(manifest_path, "manifest")
        if not isinstance(manifest, dict):
            raise RunError(f"{manifest_path}: not a camlens manifest")
        check_version(manifest.get("camlens"), folder, "explain")
        status = manifest.get("status", "complete")
        status = status if isinstance(status, str) and status else "complete"
        records = [r for r in _list(manifest.get("images")) if isinstance(r, dict)]
        methods = [m for m in _list(manifest.get("methods")) if isinstance(m, str)]
        facts = manifest
        if status != "complete":
            notes.append(f"This run was {status}: the report shows the images it finished.")
        run_id = manifest.get("run id")
        if run_id is not None:
            # A later run, killed before it wrote its own manifest, may have replaced some of
            # this run's image folders: those are that run's now, not this one's.
            owner = {r["output"]: _run_id(r) for r in found}
            replaced = [r for r in records if r.get("status") == "ok" and owner.get(r.get("output")) != run_id]
            if replaced:
                records = [r for r in records if r not in replaced]
                later = [r for r in found if _run_id(r) != run_id and r["output"] in {x.get("output") for x in replaced}]
                when = max((str(r["run"].get("created", "")) for r in later), default="")
                notes.append(
                    f"A later run{f' (started {when})' if when else ''} was stopped before it finished and replaced "
                    f"{len(replaced)} of this run's image folders ({', '.join(str(r.get('output')) for r in replaced[:5])}"
                    f"{', ...' if len(replaced) > 5 else ''}): they are left out of this report, which shows only what "
                    "this run wrote. Run `camlens explain` again to finish."
                )
    else:
        # A run killed outright before it ever wrote a manifest: its finished image folders
        # still say what they hold, and which run wrote them.
        found = [r for r in found if r["run"].get("camlens") is not None]
        if not found:
            raise RunError(f"{folder}: not a finished explain run (no manifest.json and no image folders "
                           "of this camlens version): run `camlens explain` again")
        newest = max(found, key=lambda r: str(r["run"].get("created", "")))
        found = [r for r in found if _run_id(r) == _run_id(newest) and r["run"].get("created") == newest["run"].get("created")]
        check_version(found[0]["run"].get("camlens"), folder, "explain")
        status = "interrupted"
        records = found
        methods = list(found[0]["run"].get("methods", []))
        run = found[0]["run"]
        facts = {key: run.get(key) for key in ("created", "command", "target_layers")}
        facts["model"] = {"name": run.get("model")}
        notes.append(f"This run was interrupted before it wrote manifest.json: the report shows the "
                     f"{len(found)} image folder(s) it finished.")

    colormap = (facts.get("render") or {}).get("colormap", "jet") if isinstance(facts.get("render"), dict) else "jet"
    images, failed = [], []
    for record in records:
        if record.get("status") != "ok":
            failed.append({"input": record.get("input", "?"), "error": record.get("error", "failed")})
            continue
        images.append(_image(folder, record, methods, colormap, store))
    if not images and not failed:
        raise RunError(f"{folder}: the run has no explained images yet")
    layers = facts.get("target_layers") or (facts.get("run") or {}).get("target_layers") or []
    layers = [str(layer) for layer in layers] if isinstance(layers, list) else [str(layers)]
    top_k = max((len(image["targets"]) for image in images), default=1)
    return {
        "kind": KIND,
        "title": f"camlens explain: {len(images)} image{'s' if len(images) != 1 else ''}",
        "status": status,
        "notes": notes,
        "methods": [{"name": m, "display": display_name(m)} for m in methods],
        "layers": layers,
        "top_k": top_k,
        "images": images,
        "failed": failed,
        "model": (facts.get("model") or {}).get("name") if isinstance(facts.get("model"), dict) else facts.get("model"),
        "facts": facts,
        "colormap": colormap,
        "colourbar": store.add(colour_bar(colormap), quality=95) if images else None,  # no map, no scale
    }


def _image(folder: Path, record: dict, methods: list[str], colormap: str, store: ImageStore) -> dict:
    output = record.get("output")
    if not isinstance(output, str) or not output or "/" in output or output.startswith("."):
        raise RunError(f"{folder}: an image record names no valid output folder ({output!r})")
    sub = folder / output
    files = record.get("files") or {}
    if not isinstance(files, dict):
        raise RunError(f"{folder}: the record of {output} names its files wrongly ({files!r})")
    for name in (files.get("view", "view.jpg"), files.get("maps", "maps.npz")):
        # Files of the image's own folder only: a damaged (or crafted) manifest must not pull
        # pictures from elsewhere on this computer into a report that is then sent around.
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise RunError(f"{folder}: the record of {output} names no valid file ({name!r})")
    maps = load_npz(sub / files.get("maps", "maps.npz"))
    targets = [_named(t) for t in _list(record.get("targets")) if isinstance(t, dict)]
    # An array input (a signal, a volume, a clip): its figures drawn here from the input and maps saved.
    values = _array_input(sub, maps) if files.get("kind") in ARRAY_KINDS else None
    photo = open_photo(sub / files.get("view", "view.jpg")) if values is None else input_figure(values, None, colormap)
    heat: dict[str, list[str]] = {}
    for method in methods:
        key = f"{method}/maps"
        if key not in maps:
            raise RunError(f"{sub / 'maps.npz'}: no maps of {method} (the folder is incomplete)")
        stack = maps[key]
        expected = (3,) if values is None else (values.ndim,)
        if stack.ndim not in expected or stack.shape[0] < len(targets) or (
                values is not None and stack.shape[1:] != values.shape[1:]):
            raise RunError(f"{sub / 'maps.npz'}: {method}'s maps have shape {stack.shape}, "
                           f"not one per target ({len(targets)})" + ("" if values is None else
                                                                     f" of the input's {values.shape[1:]}"))
        if values is not None:
            heat[method] = [store.add(input_figure(values, np.clip(stack[i], 0, 1), colormap))
                            for i in range(len(targets))]
            continue
        raw = [maps.shape(k) for k in maps if k.startswith(f"{method}/raw/")]
        raw_side = max((max(shape[-2:], default=1) for shape in raw), default=None)
        heat[method] = [store.heat(stack[i], photo.size, colormap, raw_side) if _box(targets[i]) is None else
                        store.add(draw_relative_box(heat_image(stack[i], photo.size, colormap, heat_side(raw_side)),
                                                    _box(targets[i])), HEAT_QUALITY)
                        for i in range(len(targets))]
    return {
        "name": Path(str(record.get("input", output))).name,
        "input": record.get("input", ""),
        "output": output,
        "size": record.get("size"),
        "photo": store.photo(photo),
        "targets": targets,
        "predictions": [_named(p) for p in _list(record.get("predictions")) if isinstance(p, dict)],
        "heat": heat,
        "timings": record.get("timings", {}),
        "blank": _blank(record.get("blank"), methods),
    }


def _box(target: dict) -> list[float] | None:
    """A detected object's box on the model's input (fractions of its width and height), where
    the record gives four finite numbers for it (a damaged one is drawn as no box)."""
    box = target.get("on input")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            and math.isfinite(v) and -1 <= v <= 2 for v in box)):
        return None
    return [float(v) for v in box]


ARRAY_KINDS = ("signal", "image", "volume", "clip")


def _array_input(sub: Path, maps) -> np.ndarray:
    """The input an array run saved with its maps, checked: (C, L), (C, H, W) or (C, D, H, W) of
    finite numbers, at most as many as camlens draws (a crafted file must not stall the report)."""
    if "input" not in maps:
        raise RunError(f"{sub / 'maps.npz'}: no input array (the folder is incomplete)")
    shape = maps.shape("input")  # from its header: nothing is read of a file that asks too much
    if len(shape) in (3, 4) and max(shape[-2:]) > MAX_SIDE:
        raise RunError(f"{sub / 'maps.npz'}: the input array of shape {shape} has slices larger than camlens draws "
                       f"in a report ({MAX_SIDE} values a side)")
    values = maps["input"]
    if values.dtype.kind not in "biuf" or not 2 <= values.ndim <= 4 or values.size == 0 or values.size > MAX_DRAWN:
        raise RunError(f"{sub / 'maps.npz'}: the input array of shape {values.shape} ({values.dtype}) is not one "
                       "camlens explain saves")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise RunError(f"{sub / 'maps.npz'}: the input array holds NaN or infinite values")
    return values


MAX_DRAWN = 2**26  # values of an array input the report draws (a 400x400x400 volume)
MAX_SIDE = 4096  # the height and width of an image's, volume's or clip's slices the report draws


def _blank(value: object, methods: list[str]) -> dict[str, list[int]]:
    """The blank maps a record names: method -> target indices (a damaged value names none)."""
    if not isinstance(value, dict):
        return {}
    return {m: [b["target"] for b in value[m] if isinstance(b, dict) and isinstance(b.get("target"), int)]
            for m in methods if isinstance(value.get(m), list)}
