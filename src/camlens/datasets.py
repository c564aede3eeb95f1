"""Evaluation datasets: labelled images, optionally with object boxes.

Labels come from class sub-folders (``DATA/<label>/*.jpg``) or a CSV of ``path,label``;
boxes from Pascal VOC XML files (one per image, same stem) or a CSV of
``path,xmin,ymin,xmax,ymax`` (one row per box, several per image allowed). Labels are mapped to
the model's class indices by name (any synonym of the label, any case), as an integer index, or
through a mapping file (JSON ``{"label": index}`` or CSV ``label,index``). Boxes in a CSV name their image
relative to the dataset (the DATA folder, or the folder of the labels CSV) and are pixel edges, ``x_max`` exclusive (a box over the first pixel is ``0,0,1,1``); VOC's 1-based
inclusive boxes are converted to that.

Problems with single entries (a missing or unreadable file, a box outside its image) are
collected in ``Dataset.problems`` and the entry is skipped: never silently counted. A label the
model does not know stops the loading with one error that lists every such label.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import CamlensError
from .io import IMAGE_SUFFIXES

Box = tuple[float, float, float, float]


@dataclass
class Sample:
    """One image: its file, the model class index of its label, and its boxes (image pixels)."""

    path: Path
    label: int
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Dataset:
    samples: list[Sample]
    skipped: list[str]  # images that could not be used, with the reason
    notes: list[str]  # boxes that could not be used, with the reason
    has_boxes: bool

    @property
    def problems(self) -> list[str]:
        return self.skipped + self.notes


def _read_csv(path: Path, columns: int) -> list[list[str]]:
    """Rows of a CSV with at least ``columns`` fields; a header row (non-numeric) is skipped."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as error:
        raise CamlensError(f"{path}: cannot read the CSV ({getattr(error, 'strerror', None) or error})") from None
    short = [i + 1 for i, row in enumerate(rows) if len(row) < columns]
    if short:
        raise CamlensError(f"{path}: line {short[0]} has fewer than {columns} fields")
    return [[cell.strip() for cell in row] for row in rows]


def class_index_lookup(class_names: Sequence[str], class_labels: Sequence[str] | None = None,
                       mapping: Path | None = None) -> dict[str, int]:
    """Lower-case label -> class index: from the mapping file if given, else names and synonyms."""
    if mapping is not None:
        if mapping.suffix.lower() == ".json":
            try:
                table = json.loads(mapping.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CamlensError(f"{mapping}: not a readable JSON mapping ({error})") from None
            if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
                raise CamlensError(f"{mapping}: the JSON must map labels to class indices")
            pairs = table.items()
        else:
            rows = _read_csv(mapping, 2)
            if rows and not rows[0][1].lstrip("-").isdigit():
                rows = rows[1:]
            try:
                pairs = [(label, int(index)) for label, index, *_ in rows]
            except ValueError:
                raise CamlensError(f"{mapping}: the second column must be class indices") from None
        return {str(label).strip().lower(): index for label, index in pairs}
    lookup: dict[str, int] = {}
    for index, name in enumerate(class_names):
        full = class_labels[index] if class_labels else name
        for key in {name, full, *full.split(",")}:
            lookup.setdefault(key.strip().lower(), index)
    return lookup


def load_dataset(
    data: str | Path,
    class_names: Sequence[str] | None,
    classes: int,
    class_labels: Sequence[str] | None = None,
    mapping: str | Path | None = None,
    boxes: str | Path | None = None,
) -> Dataset:
    """Load labels (and boxes) from a folder of class sub-folders or a ``path,label`` CSV.

    ``boxes`` is a CSV of boxes or a folder of VOC XML files; when omitted, XML files beside
    the images are used if there are any.
    """
    data = Path(data)
    if not data.exists():
        raise CamlensError(f"{data}: no such dataset (a folder of class folders, or a CSV of path,label)")
    lookup = class_index_lookup(class_names or [], class_labels, Path(mapping) if mapping else None)
    entries = _entries(data)
    if not entries:
        raise CamlensError(f"{data}: the dataset has no images")
    unknown: set[str] = set()
    labelled: list[tuple[Path, int]] = []
    for path, label in entries:
        index = _class_index(label, lookup, classes)
        if index is None:
            unknown.add(label)
        else:
            labelled.append((path, index))
    if unknown:
        names = ", ".join(sorted(unknown)[:10]) + (" ..." if len(unknown) > 10 else "")
        raise CamlensError(
            f"{len(unknown)} label(s) the model does not know: {names}; give a mapping file (label,index)"
        )
    skipped: list[str] = []
    notes: list[str] = []
    box_table = _boxes(data, labelled, Path(boxes) if boxes else None, notes)
    samples = []
    for path, index in labelled:
        if not path.is_file():
            skipped.append(f"{path}: no such file (skipped)")
            continue
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception as error:  # any reason an image cannot be opened: report, skip
            skipped.append(f"{path}: unreadable image, {type(error).__name__} (skipped)")
            continue
        kept = []
        for box in box_table.get(path.resolve(), []):
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                notes.append(f"{path}: box {box} is outside the {width}x{height} image or empty (box skipped)")
            else:
                kept.append(box)
        samples.append(Sample(path, index, kept))
    if not samples:
        raise CamlensError(f"{data}: no readable image in the dataset ({len(skipped)} skipped)")
    return Dataset(samples, skipped, notes, has_boxes=bool(box_table))


def _entries(data: Path) -> list[tuple[Path, str]]:
    if data.is_file():
        rows = _read_csv(data, 2)
        if rows and rows[0][0].lower() == "path":
            rows = rows[1:]
        return [((data.parent / path), label) for path, label, *_ in rows]
    entries = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                entries.append((path, folder.name))
    return entries


def _class_index(label: str, lookup: dict[str, int], classes: int) -> int | None:
    key = label.strip().lower()
    if key in lookup:
        return lookup[key]
    if key.lstrip("-").isdigit() and 0 <= int(key) < classes:
        return int(key)
    return None


def _boxes(data: Path, labelled: list[tuple[Path, int]], source: Path | None,
           problems: list[str]) -> dict[Path, list[Box]]:
    table: dict[Path, list[Box]] = defaultdict(list)
    if source is not None and source.is_file():
        root = data if data.is_dir() else data.parent
        known = {path.resolve() for path, _ in labelled}
        rows = _read_csv(source, 5)
        if rows and rows[0][0].lower() == "path":
            rows = rows[1:]
        for row in rows:
            try:
                box = tuple(float(v) for v in row[1:5])
            except ValueError:
                problems.append(f"{source}: box row {row} is not numeric (skipped)")
                continue
            image = (root / row[0]).resolve()
            if image not in known:
                problems.append(f"{source}: box for {row[0]}, which is not in the dataset (skipped)")
                continue
            table[image].append(box)
        return dict(table)
    for path, _ in labelled:
        xml = (source / f"{path.stem}.xml") if source is not None else path.with_suffix(".xml")
        if xml.is_file():
            try:
                root = ElementTree.parse(xml).getroot()
                for node in root.iter("bndbox"):
                    x0, y0, x1, y1 = (float(node.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
                    # VOC counts pixels from 1, both ends included: as edges, (x0 - 1, y0 - 1, x1, y1).
                    table[path.resolve()].append((x0 - 1, y0 - 1, x1, y1))
            except (ElementTree.ParseError, TypeError, ValueError):
                problems.append(f"{xml}: not a Pascal VOC annotation (boxes skipped)")
    return dict(table)
