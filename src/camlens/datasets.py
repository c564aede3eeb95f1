"""Evaluation datasets: labelled images, optionally with object boxes.

Labels come from class sub-folders (``DATA/<label>/*.jpg``) or a CSV of ``path,label``;
boxes from Pascal VOC XML files (one per image, same stem) or a CSV of
``path,xmin,ymin,xmax,ymax`` (one row per box, several per image allowed). Labels are mapped to
the model's class indices by name (any synonym of the label, any case), as an integer index, or
through a mapping file (JSON ``{"label": index}`` or CSV ``label,index``). Boxes in a CSV name their image
relative to the dataset (the DATA folder, or the folder of the labels CSV) and are pixel edges, ``x_max`` exclusive (a box over the first pixel is ``0,0,1,1``); VOC's 1-based
inclusive boxes are converted to that. Boxes are in the pixels of the image as viewers show it
(EXIF orientation applied).

Problems with single entries (a missing or unreadable file, a box outside its image, an entry
listed twice) are collected in ``Dataset.problems`` and the entry is skipped or counted once:
never silently counted, never silently lost. What makes the dataset ambiguous stops the loading
with one error: a label the model does not know or that names several classes (every such label
listed), an image listed with two different labels, a mapping to a class the model does not
have, a ``boxes`` file or folder that does not exist or gives no box.
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
# EXIF orientations that turn the image by 90 degrees: viewers swap its width and height.
_TURNED = {5, 6, 7, 8}


@dataclass
class Sample:
    """One image: its file, the model class index of its label, its boxes (image pixels), and
    its size (width, height) as viewers show it."""

    path: Path
    label: int
    boxes: list[Box] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)


@dataclass
class Dataset:
    samples: list[Sample]  # the readable images among the first ``limit`` listed
    skipped: list[str]  # images that could not be used, with the reason
    notes: list[str]  # boxes that could not be used and entries listed twice, with the reason
    has_boxes: bool
    listed: list[Path] = field(default_factory=list)  # every labelled image, before the limit

    @property
    def problems(self) -> list[str]:
        return self.skipped + self.notes


def _read_csv(path: Path, columns: int) -> list[list[str]]:
    """Rows of a CSV with at least ``columns`` fields; a header row (non-numeric) is skipped."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CamlensError(f"{path}: cannot read the CSV ({getattr(error, 'strerror', None) or error})") from None
    short = [i + 1 for i, row in enumerate(rows) if len(row) < columns]
    if short:
        raise CamlensError(f"{path}: line {short[0]} has fewer than {columns} fields")
    return [[cell.strip() for cell in row] for row in rows]


def _mapping_pairs(mapping: Path) -> list[tuple[str, int]]:
    if mapping.suffix.lower() == ".json":
        try:
            table = json.loads(mapping.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CamlensError(f"{mapping}: not a readable JSON mapping ({error})") from None
        if not isinstance(table, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
            raise CamlensError(f"{mapping}: the JSON must map labels to class indices")
        return list(table.items())
    rows = _read_csv(mapping, 2)
    if rows and not rows[0][1].lstrip("-").isdigit():
        rows = rows[1:]
    try:
        return [(label, int(index)) for label, index, *_ in rows]
    except ValueError:
        raise CamlensError(f"{mapping}: the second column must be class indices") from None


def class_index_lookup(class_names: Sequence[str], class_labels: Sequence[str] | None = None,
                       mapping: Path | None = None, classes: int | None = None) -> dict[str, list[int]]:
    """Lower-case label -> the class indices it names: from the mapping file if given (checked
    against the ``classes`` of the model up front), else class names, full labels and synonyms.
    A label with more than one index is ambiguous."""
    if mapping is not None:
        lookup: dict[str, list[int]] = {}
        for label, index in _mapping_pairs(mapping):
            if classes is not None and not 0 <= index < classes:
                raise CamlensError(
                    f"{mapping}: label {label!r} maps to class {index}, but the model has {classes} classes "
                    f"(0 to {classes - 1})"
                )
            key = str(label).strip().lower()
            if lookup.setdefault(key, [index]) != [index]:
                raise CamlensError(f"{mapping}: label {label!r} is mapped twice, to {lookup[key][0]} and {index}")
        return lookup
    found: dict[str, set[int]] = defaultdict(set)
    for index, name in enumerate(class_names):
        full = class_labels[index] if class_labels else name
        for key in {name, full, *full.split(",")}:
            found[key.strip().lower()].add(index)
    return {key: sorted(indices) for key, indices in found.items()}


def load_dataset(
    data: str | Path,
    class_names: Sequence[str] | None,
    classes: int,
    class_labels: Sequence[str] | None = None,
    mapping: str | Path | None = None,
    boxes: str | Path | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load labels (and boxes) from a folder of class sub-folders or a ``path,label`` CSV.

    ``boxes`` is a CSV of boxes or a folder of VOC XML files; when omitted, XML files beside
    the images are used if there are any. Every label is checked; only the first ``limit``
    listed images are opened (folder order: class folders and files sorted by name; CSV order).
    """
    data = Path(data)
    if not data.exists():
        raise CamlensError(f"{data}: no such dataset (a folder of class folders, or a CSV of path,label)")
    if boxes is not None and not Path(boxes).exists():
        raise CamlensError(f"--boxes {boxes}: no such file or folder (a CSV path,xmin,ymin,xmax,ymax or a folder of VOC XML files)")
    lookup = class_index_lookup(class_names or [], class_labels, Path(mapping) if mapping else None, classes)
    notes: list[str] = []
    entries = dataset_entries(data, notes)
    if not entries:
        raise CamlensError(f"{data}: the dataset has no images")
    labelled = _labelled(data, entries, lookup, classes, notes)
    box_table = _boxes(data, labelled, Path(boxes) if boxes else None, notes)
    skipped: list[str] = []
    samples = []
    for path, index in labelled[:limit]:
        if not path.is_file():
            skipped.append(f"{path}: no such file (skipped)")
            continue
        try:
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(0x0112) in _TURNED:
                    width, height = height, width
        except Exception as error:  # any reason an image cannot be opened: report, skip
            skipped.append(f"{path}: unreadable image, {type(error).__name__} (skipped)")
            continue
        kept = []
        for box in box_table.get(path.resolve(), []):
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                notes.append(f"{path}: box {box} is outside the {width}x{height} image or empty (box skipped)")
            elif box in kept:
                notes.append(f"{path}: box {box} is given twice (counted once)")
            else:
                kept.append(box)
        samples.append(Sample(path, index, kept, (width, height)))
    if not samples:
        raise CamlensError(f"{data}: no readable image in the dataset ({len(skipped)} skipped)")
    return Dataset(samples, skipped, notes, bool(box_table), [path for path, _ in labelled])


def _labelled(data: Path, entries: list[tuple[Path, str]], lookup: dict[str, list[int]], classes: int,
              notes: list[str]) -> list[tuple[Path, int]]:
    """Each image once with its class index; unknown, ambiguous or conflicting labels stop here."""
    unknown: set[str] = set()
    ambiguous: dict[str, list[int]] = {}
    first: dict[Path, tuple[Path, str, int]] = {}
    conflicts: list[str] = []
    labelled: list[tuple[Path, int]] = []
    for path, label in entries:
        indices = _class_indices(label, lookup, classes)
        if not indices:
            unknown.add(label)
            continue
        if len(indices) > 1:
            ambiguous[label] = indices
            continue
        resolved = path.resolve()
        if resolved in first:
            seen_path, seen_label, seen_index = first[resolved]
            if seen_index == indices[0]:
                notes.append(f"{path}: listed twice with label {label!r} (counted once)")
            else:
                conflicts.append(f"{path} ({seen_label!r} and {label!r})")
            continue
        first[resolved] = (path, label, indices[0])
        labelled.append((path, indices[0]))
    if unknown:
        names = ", ".join(sorted(unknown)[:10]) + (" ..." if len(unknown) > 10 else "")
        raise CamlensError(
            f"{len(unknown)} label(s) the model does not know: {names}; give a mapping file (label,index)"
        )
    if ambiguous:
        names = "; ".join(f"{label!r}: classes {', '.join(map(str, indices))}" for label, indices in sorted(ambiguous.items())[:5])
        raise CamlensError(
            f"{len(ambiguous)} label(s) name several classes ({names}); give a mapping file (label,index)"
        )
    if conflicts:
        raise CamlensError(
            f"{data}: {len(conflicts)} image(s) listed with two different labels: {'; '.join(conflicts[:5])}"
            + (" ..." if len(conflicts) > 5 else "") + "; keep one label per image"
        )
    return labelled


def dataset_entries(data: Path, notes: list[str]) -> list[tuple[Path, str]]:
    """The (image path, label) pairs a dataset lists, in its order: the rows of a ``path,label``
    CSV, or the images of each class folder (sorted). What is not an entry goes into ``notes``."""
    if data.is_file():
        rows = _read_csv(data, 2)
        if rows and rows[0][0].lower() == "path":
            rows = rows[1:]
        return [((data.parent / path), label) for path, label, *_ in rows]
    entries = []
    for path in sorted(data.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_dir():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                notes.append(f"{path}: an image outside the class folders (ignored)")
            continue
        for file in sorted(path.iterdir()):
            if file.name.startswith("."):
                continue
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.is_dir():
                entries.append((file, path.name))
            elif file.is_dir():
                notes.append(f"{file}: a folder inside a class folder (not searched)")
            elif file.suffix.lower() != ".xml":  # VOC boxes beside the images are expected
                notes.append(f"{file}: not an image, by its extension (ignored)")
    return entries


def _class_indices(label: str, lookup: dict[str, list[int]], classes: int) -> list[int]:
    key = label.strip().lower()
    if key in lookup:
        return lookup[key]
    if key.isdigit() and int(key) < classes:
        return [int(key)]
    return []


def _boxes(data: Path, labelled: list[tuple[Path, int]], source: Path | None,
           problems: list[str]) -> dict[Path, list[Box]]:
    table: dict[Path, list[Box]] = defaultdict(list)
    if source is not None and source.is_file():
        root = data if data.is_dir() else data.parent
        known = {path.resolve() for path, _ in labelled}
        rows = _read_csv(source, 5)
        if rows and rows[0][0].lower() == "path":
            rows = rows[1:]
        if not rows:
            raise CamlensError(f"--boxes {source}: the CSV has no box rows (path,xmin,ymin,xmax,ymax)")
        unmatched: list[tuple[str, Path]] = []
        for row in rows:
            try:
                box = tuple(float(v) for v in row[1:5])
            except ValueError:
                problems.append(f"{source}: box row {row} is not numeric (skipped)")
                continue
            image = (root / row[0]).resolve()
            if image not in known:
                unmatched.append((row[0], root / row[0]))
                continue
            table[image].append(box)
        if not table and unmatched:
            # Typically paths written relative to the working directory: every row misses.
            where = f"the dataset folder {data}" if data.is_dir() else f"the labels CSV's folder {root}"
            path, resolved = unmatched[0]
            raise CamlensError(
                f"--boxes {source}: no row names an image of the dataset; its paths are relative to {where} "
                f"(e.g. {path!r} is {resolved}, which the dataset does not list)"
            )
        if not table:
            raise CamlensError(f"--boxes {source}: no row has numeric box edges (path,xmin,ymin,xmax,ymax)")
        problems.extend(f"{source}: box for {path}, which is not in the dataset (skipped)" for path, _ in unmatched)
        return dict(table)
    found = 0
    for path, _ in labelled:
        xml = (source / f"{path.stem}.xml") if source is not None else path.with_suffix(".xml")
        if xml.is_file():
            found += 1
            try:
                root = ElementTree.parse(xml).getroot()
                for node in root.iter("bndbox"):
                    x0, y0, x1, y1 = (float(node.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
                    # VOC counts pixels from 1, both ends included: as edges, (x0 - 1, y0 - 1, x1, y1).
                    table[path.resolve()].append((x0 - 1, y0 - 1, x1, y1))
            except (ElementTree.ParseError, TypeError, ValueError):
                problems.append(f"{xml}: not a Pascal VOC annotation (boxes skipped)")
    if source is not None and not found:
        raise CamlensError(f"--boxes {source}: no VOC XML file there is named after an image of the dataset (<image stem>.xml)")
    return dict(table)
