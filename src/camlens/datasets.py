"""Evaluation datasets: labelled images, optionally with object boxes.

Labels come from class sub-folders (``DATA/<label>/*.jpg``) or a CSV of ``path,label``;
boxes from Pascal VOC XML files (one per image, same stem) or a CSV of
``path,xmin,ymin,xmax,ymax`` (one row per box, several per image allowed). Labels are mapped to
the model's class indices by name (any synonym of the label, any case), as an integer index, or
through a mapping file (JSON ``{"label": index}`` or CSV ``label,index``). Boxes in a CSV name their image
relative to the dataset (the DATA folder, or the folder of the labels CSV) and are pixel edges, ``x_max`` exclusive (a box over the first pixel is ``0,0,1,1``); VOC's 1-based
inclusive boxes are converted to that. Boxes are in the pixels of the image as viewers show it
(EXIF orientation applied).

A CUB-200-2011 folder in its native layout (``images.txt``, ``image_class_labels.txt``,
``train_test_split.txt``, ``classes.txt``, ``images/``, optionally ``bounding_boxes.txt``) is read
with its official split and boxes as they are: :func:`load_cub` reads either split,
:func:`load_dataset` its test split (the one evaluation uses). Its labels are the class names of
``classes.txt`` (``001.Black_footed_Albatross``, ...); its boxes, ``<x> <y> <width> <height>`` in
pixels from the top-left corner, become the edges ``(x, y, x + width, y + height)``.

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
import re
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import CamlensError
from .io import ARRAY_SUFFIXES, IMAGE_SUFFIXES, is_array_file

INPUT_SUFFIXES = IMAGE_SUFFIXES | ARRAY_SUFFIXES  # images, and arrays (signals, volumes, clips)

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
    split: str | None = None  # the CUB-200-2011 split read ("train" or "test"); None for other datasets

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


def word_matches(text: str, lookup: dict[str, list[int]]) -> list[int]:
    """The classes one of whose names or synonyms holds ``text`` as whole words ("cat": tabby cat,
    tiger cat, Persian cat, Siamese cat, Egyptian cat; not "catamaran"), for a name that is no
    class's own."""
    wanted = " ".join(text.strip().lower().split())
    if not wanted or wanted.isdigit():
        return []
    pattern = re.compile(rf"(?<!\w){re.escape(wanted)}(?!\w)")
    return sorted({index for key, indices in lookup.items() if pattern.search(key) for index in indices})


def describe_classes(indices: Sequence[int], lookup: dict[str, list[int]], shown: int = 8,
                     labels: Sequence[str] | None = None) -> str:
    """``281 (tabby, tabby cat), 282 (tiger cat), ...``: classes by index and their names (their
    ``labels`` where given, else the lookup's lower-case keys), at most ``shown``."""
    names: dict[int, list[str]] = defaultdict(list)
    for key, found in lookup.items():
        for index in found:
            names[index].append(key)

    def named(index: int) -> str:
        if labels is not None and 0 <= index < len(labels):
            return labels[index]
        return ", ".join(sorted(names[index], key=len)[:2])

    parts = [f"{index} ({named(index)})" for index in indices[:shown]]
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return ", ".join(parts) + more


def load_dataset(
    data: str | Path,
    class_names: Sequence[str] | None,
    classes: int,
    class_labels: Sequence[str] | None = None,
    mapping: str | Path | None = None,
    boxes: str | Path | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load labels (and boxes) from a folder of class sub-folders, a ``path,label`` CSV, or the
    test split of a CUB-200-2011 folder (see :func:`load_cub`; ``Dataset.split`` is then "test",
    which callers may state: it is not put in the notes, which they show as problems).

    ``boxes`` is a CSV of boxes or a folder of VOC XML files; when omitted, XML files beside
    the images are used if there are any (a CUB-200-2011 folder has its own, so it takes none).
    Every label is checked; only the first ``limit`` listed images are opened (folder order: class
    folders and files sorted by name; CSV order; CUB order: by image id).
    """
    data = Path(data)
    if not data.exists():
        raise CamlensError(f"{data}: no such dataset (a folder of class folders, a CSV of path,label, "
                           "or a CUB-200-2011 folder)")
    if is_cub(data):
        if boxes is not None:
            raise CamlensError(f"--boxes {boxes}: {data} is a CUB-200-2011 folder, whose boxes are its "
                               "bounding_boxes.txt; leave out --boxes")
        return load_cub(data, "test", class_names, classes, class_labels, mapping, limit)
    if boxes is not None and not Path(boxes).exists():
        raise CamlensError(f"--boxes {boxes}: no such file or folder (a CSV path,xmin,ymin,xmax,ymax or a folder of VOC XML files)")
    lookup = class_index_lookup(class_names or [], class_labels, Path(mapping) if mapping else None, classes)
    notes: list[str] = []
    entries = dataset_entries(data, notes)
    if not entries:
        inner = [path for path in sorted(data.iterdir()) if is_cub(path)] if data.is_dir() else []
        hint = f" (did you mean the CUB-200-2011 folder {inner[0]}?)" if inner else ""
        raise CamlensError(f"{data}: the dataset has no images{hint}")
    labelled = _labelled(data, entries, lookup, classes, notes, None if mapping else (class_labels or class_names))
    box_table = _boxes(data, labelled, Path(boxes) if boxes else None, notes)
    return _opened(data, labelled, box_table, notes, limit, bool(box_table))


def _opened(data: Path, labelled: list[tuple[Path, int]], box_table: dict[Path, list[Box]], notes: list[str],
            limit: int | None, has_boxes: bool) -> Dataset:
    """The dataset of the first ``limit`` labelled images that open, each with its boxes that
    fit in it (``box_table`` is keyed by resolved path); the others are reported."""
    skipped: list[str] = []
    samples = []
    for path, index in labelled[:limit]:
        if not path.is_file():
            skipped.append(f"{path}: no such file (skipped)")
            continue
        if is_array_file(path):  # a signal, volume or clip: read (and checked) when it is evaluated
            if box_table.get(path.resolve()):
                notes.append(f"{path}: boxes are an image's, not an array's (boxes ignored)")
            samples.append(Sample(path, index))
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
    return Dataset(samples, skipped, notes, has_boxes, [path for path, _ in labelled])


def _labelled(data: Path, entries: list[tuple[Path, str]], lookup: dict[str, list[int]], classes: int,
              notes: list[str], labels: Sequence[str] | None = None) -> list[tuple[Path, int]]:
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
        candidates = [f"{label!r} may be {describe_classes(found, lookup, 5, labels)}" for label in sorted(unknown)[:3]
                      if (found := word_matches(label, lookup))]
        hint = f" ({'; '.join(candidates)})" if candidates else ""
        raise CamlensError(
            f"{len(unknown)} label(s) the model does not know: {names}{hint}; name the folders by class names, or "
            "give a mapping file (label,index)"
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
    CSV, the images (or ``.npy``/``.npz`` arrays) of each class folder (sorted), or every image of a CUB-200-2011 folder, both
    splits, by image id, labelled with its ``classes.txt`` name. What is not an entry goes into
    ``notes``."""
    if is_cub(data):
        return [(path, label) for _, path, label, _ in _cub_images(Path(data))]
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
            if path.suffix.lower() in INPUT_SUFFIXES:
                notes.append(f"{path}: an input outside the class folders (ignored)")
            continue
        for file in sorted(path.iterdir()):
            if file.name.startswith("."):
                continue
            if file.suffix.lower() in INPUT_SUFFIXES and not file.is_dir():
                entries.append((file, path.name))
            elif file.is_dir():
                notes.append(f"{file}: a folder inside a class folder (not searched)")
            elif file.suffix.lower() != ".xml":  # VOC boxes beside the images are expected
                notes.append(f"{file}: not an image or array, by its extension (ignored)")
    return entries


def _class_indices(label: str, lookup: dict[str, list[int]], classes: int) -> list[int]:
    """The classes ``label`` names: by name or synonym, and by index when it is a number. A number
    that is also the name of another class (names "1", "0", "2") names both, and is ambiguous, as
    ``camlens explain --class`` takes it too."""
    key = label.strip().lower()
    found = set(lookup.get(key, []))
    if key.isdigit() and int(key) < classes:
        found.add(int(key))
    return sorted(found)


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
    if source is not None:
        # In a folder of XML files an image is known by its stem alone: images of one stem in two
        # class folders would each get the boxes of the other.
        stems: dict[str, list[Path]] = defaultdict(list)
        for path, _ in labelled:
            stems[path.stem].append(path)
        shared = {stem: paths for stem, paths in stems.items() if len(paths) > 1 and (source / f"{stem}.xml").is_file()}
        if shared:
            stem, paths = next(iter(shared.items()))
            raise CamlensError(
                f"--boxes {source}: {len(shared)} XML file(s) there would stand for several images of the same name "
                f"({stem}.xml: {', '.join(map(str, paths[:3]))}); put each image's XML file beside it instead"
            )
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
                table.pop(path.resolve(), None)  # none of a damaged file's boxes, not the ones before the damage
                note = f"{xml}: not a Pascal VOC annotation (boxes skipped)"
                if note not in problems:  # one note per file, however many images it serves
                    problems.append(note)
    if source is not None and not found:
        raise CamlensError(f"--boxes {source}: no VOC XML file there is named after an image of the dataset (<image stem>.xml)")
    return dict(table)


# CUB-200-2011. A damaged list (a line that is not in the list's form, an id given twice, an image
# id one list has and another lacks, a class id classes.txt does not name) stops the loading with
# one error naming the file and line: reading past it would change the official split or labels.
# What concerns one image only (its file missing or unreadable, its box missing from
# bounding_boxes.txt or outside the image) is a problem of that entry, as for other datasets.
_CUB_LISTS = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def is_cub(path: str | Path) -> bool:
    """Whether ``path`` is a CUB-200-2011 folder: images.txt, image_class_labels.txt and
    train_test_split.txt side by side. (Its images/ folder is not part of the test, so that a
    missing one is reported as such rather than the folder being read as class folders.)"""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in _CUB_LISTS)


def cub_class_names(root: str | Path) -> list[str]:
    """The class names of a CUB-200-2011 folder, from its classes.txt in class-id order."""
    return list(_cub_classes(Path(root)).values())


def load_cub(
    root: str | Path,
    split: str,
    class_names: Sequence[str] | None,
    classes: int,
    class_labels: Sequence[str] | None = None,
    mapping: str | Path | None = None,
    limit: int | None = None,
) -> Dataset:
    """One split ("train" or "test") of a CUB-200-2011 folder, as train_test_split.txt has it,
    by image id. Labels are the classes.txt names of the images' classes, mapped to the model's
    classes as :func:`load_dataset` maps labels; boxes are from bounding_boxes.txt (``has_boxes``
    when that file is there), ``<x> <y> <width> <height>`` becoming ``(x, y, x + width, y + height)``.
    A damaged list file stops with one error naming the file and line; an image without a box,
    a missing or unreadable image, a box outside its image are reported in ``Dataset.problems``."""
    root = Path(root)
    if split not in ("train", "test"):
        raise CamlensError(f"CUB-200-2011 split must be 'train' or 'test', got {split!r}")
    if not is_cub(root):
        raise CamlensError(f"{root}: not a CUB-200-2011 folder (it needs {', '.join(_CUB_LISTS)})")
    if not (root / "images").is_dir():
        raise CamlensError(f"{root / 'images'}: no such folder; a CUB-200-2011 folder keeps its images there")
    lookup = class_index_lookup(class_names or [], class_labels, Path(mapping) if mapping else None, classes)
    every = _cub_images(root)
    table = [row for row in every if row[3] == (split == "train")]
    if not table:
        raise CamlensError(f"{root / 'train_test_split.txt'}: no image is in the {split} split")
    boxes = _cub_boxes(root, {image_id for image_id, *_ in every})
    notes: list[str] = []
    labelled = _labelled(root, [(path, label) for _, path, label, _ in table], lookup, classes, notes)
    box_table = {path.resolve(): [boxes[image_id]] for image_id, path, *_ in table if image_id in (boxes or {})}
    if boxes is not None:
        ids = {path.resolve(): image_id for image_id, path, *_ in table}
        notes += [f"{path}: bounding_boxes.txt has no box for image id {ids[path.resolve()]} (no box)"
                  for path, _ in labelled[:limit] if path.resolve() not in box_table]
    dataset = _opened(root, labelled, box_table, notes, limit, boxes is not None)
    dataset.split = split
    return dataset


def _cub_rows(root: Path, name: str, form: str) -> dict[int, tuple[int, list[str]]]:
    """Image or class id -> (line number, other fields) of a CUB list whose lines are ``form``;
    a last field ending in ``_name`` may hold spaces, the others are single words."""
    path = root / name
    fields = len(form.split())
    named = form.endswith("_name>")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CamlensError(f"{path}: missing; a CUB-200-2011 folder has {name} with lines {form}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CamlensError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    rows: dict[int, tuple[int, list[str]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=fields - 1) if named else line.split()
        if len(parts) != fields or not (parts[0].isascii() and parts[0].isdigit()):
            raise CamlensError(f"{path}: line {number} is not {form}: {line.strip()[:80]!r}")
        key = int(parts[0])
        if key in rows:
            raise CamlensError(f"{path}: line {number} repeats id {key} of line {rows[key][0]}")
        rows[key] = (number, parts[1:])
    if not rows:
        raise CamlensError(f"{path}: empty; a CUB-200-2011 folder has {name} with lines {form}")
    return rows


def _cub_classes(root: Path) -> dict[int, str]:
    rows = _cub_rows(root, "classes.txt", "<class_id> <class_name>")
    first: dict[str, int] = {}
    for number, (name,) in rows.values():  # in line order
        if first.setdefault(name, number) != number:
            raise CamlensError(f"{root / 'classes.txt'}: line {number} repeats the class name {name!r} "
                               f"of line {first[name]}")
    return {class_id: name for class_id, (_, (name,)) in sorted(rows.items())}


def _cub_ids(root: Path, images: Iterable[int], rows: dict, name: str, complete: bool = True) -> None:
    """Refuse a list naming an image id images.txt lacks, or (``complete``) lacking one it has."""
    extra = sorted(set(rows) - set(images))
    if extra:
        raise CamlensError(f"{root / name}: line {rows[extra[0]][0]}: image id {extra[0]} is not in images.txt")
    missing = sorted(set(images) - set(rows))
    if complete and missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CamlensError(f"{root / name}: no line for image id {missing[0]}{more} of images.txt")


def _cub_images(root: Path) -> list[tuple[int, Path, str, bool]]:
    """(image id, image file, class name, is a training image) of every image, by image id."""
    class_of = _cub_classes(root)
    images = _cub_rows(root, "images.txt", "<image_id> <image_name>")
    labels = _cub_rows(root, "image_class_labels.txt", "<image_id> <class_id>")
    split = _cub_rows(root, "train_test_split.txt", "<image_id> <is_training_image>")
    _cub_ids(root, images, labels, "image_class_labels.txt")
    _cub_ids(root, images, split, "train_test_split.txt")
    table = []
    for image_id, (_, (name,)) in sorted(images.items()):
        number, (class_id,) = labels[image_id]
        if not (class_id.isascii() and class_id.isdigit() and int(class_id) in class_of):
            raise CamlensError(f"{root / 'image_class_labels.txt'}: line {number}: class id {class_id!r} "
                               "is not in classes.txt")
        number, (flag,) = split[image_id]
        if flag not in ("0", "1"):
            raise CamlensError(f"{root / 'train_test_split.txt'}: line {number}: is_training_image must be "
                               f"1 or 0, not {flag!r}")
        table.append((image_id, root / "images" / name, class_of[int(class_id)], flag == "1"))
    return table


def _cub_boxes(root: Path, images: set[int]) -> dict[int, Box] | None:
    """Image id -> box edges from bounding_boxes.txt; None without that file."""
    if not (root / "bounding_boxes.txt").is_file():
        return None
    rows = _cub_rows(root, "bounding_boxes.txt", "<image_id> <x> <y> <width> <height>")
    _cub_ids(root, images, rows, "bounding_boxes.txt", complete=False)
    boxes = {}
    for image_id, (number, values) in rows.items():
        try:
            x, y, width, height = (float(value) for value in values)
        except ValueError:
            raise CamlensError(f"{root / 'bounding_boxes.txt'}: line {number}: x, y, width and height must be "
                               f"numbers, not {' '.join(values)!r}") from None
        boxes[image_id] = (x, y, x + width, y + height)  # corner and size -> pixel edges, x1 exclusive
    return boxes
