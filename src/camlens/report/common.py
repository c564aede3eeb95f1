"""What every kind of report shares: reading a run folder safely, the image store, the templates.

Images are stored once: each is encoded one time (JPEG, downscaled) into a JSON object of the
page, keyed by a short reference; the page's script gives every ``<img data-ref=...>`` its
source from there, so a photo shown beside several maps, or a map shown in two panels, is in
the file once.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import CamlensError
from ..io import os_reason

# The photo is shown at up to PHOTO_SIDE CSS pixels; a map is smooth at the scale of its layer
# (7 x 7 on the embedded model), so HEAT_SIDE pixels draw it as sharply once the browser scales
# it up, unless its layer is finer than that (then it keeps up to PHOTO_SIDE).
PHOTO_SIDE = 320
HEAT_SIDE = 160
PHOTO_QUALITY = 82
HEAT_QUALITY = 78


def one_line(text: str) -> str:
    """``text`` as one printable line: a newline or other control character in a folder or file
    name is shown escaped (``\\n``), undecodable bytes as U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape" if not any("\ud800" <= c < "\udc80" for c in text)
                           else "replace").decode("utf-8", "replace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class RunError(CamlensError):
    """A run folder a report cannot be made from, with what to do about it (always one line)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a run, or a RunError that says which file and why."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except OSError as error:
        raise RunError(f"{path}: cannot be read ({os_reason(error)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path}: not a valid {what} (is the run folder damaged? {error})") from None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and the number of lines that could not be read (a run
    killed while writing leaves its last line cut)."""
    records, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RunError(f"{path}: cannot be read ({os_reason(error)})") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def check_version(made_by: object, folder: Path, command: str) -> None:
    """Refuse a run of another camlens version: its files may not mean what this one's do."""
    if made_by == __version__:
        return
    if not isinstance(made_by, str) or not made_by:
        raise RunError(f"{folder}: the run does not say which camlens made it (camlens before 0.3 did not); "
                       f"run `camlens {command}` again with camlens {__version__}")
    raise RunError(f"{folder}: made by camlens {made_by}; this is camlens {__version__}, which reports only "
                   f"its own runs: run `camlens {command}` again, or report it with camlens {made_by}")


def _encode(image: Image.Image, quality: int) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True, progressive=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def fit(image: Image.Image, side: int) -> Image.Image:
    """``image`` downscaled (never up) so that its longer side is at most ``side`` pixels."""
    scale = side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def heat_image(saliency: np.ndarray, shape: tuple[int, int], colormap: str, side: int) -> Image.Image:
    """A map (H, W) in [0, 1] coloured with ``colormap``, at the aspect of ``shape`` (w, h) and at
    most ``side`` pixels on its longer side."""
    from ..render import colorize

    width, height = shape
    scale = min(1.0, side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    field = Image.fromarray(np.nan_to_num(np.asarray(saliency, dtype=np.float32)), mode="F")
    field = field.resize(size, Image.Resampling.BILINEAR)
    return Image.fromarray(colorize(np.asarray(field), colormap))


def heat_side(raw_side: int | None) -> int:
    """Pixels to keep of a map whose layer is ``raw_side`` cells across: fine layers keep more."""
    if raw_side is None or raw_side <= 20:
        return HEAT_SIDE
    return min(PHOTO_SIDE, max(HEAT_SIDE, 8 * raw_side))


@dataclass
class ImageStore:
    """Each image once, as a data URI under a short reference (``"i0"``, ``"i1"``, ...)."""

    images: dict[str, str] = field(default_factory=dict)
    _keys: dict[Any, str] = field(default_factory=dict)
    _uris: dict[str, str] = field(default_factory=dict)

    def add(self, image: Image.Image, quality: int = PHOTO_QUALITY, key: Any = None) -> str:
        """The reference of ``image``; a picture equal to one stored before (CAM's and Grad-CAM's
        maps are the same on a network that pools globally) gets that one's reference."""
        if key is not None and key in self._keys:
            return self._keys[key]
        uri = _encode(image, quality)
        reference = self._uris.get(uri)
        if reference is None:
            reference = self._uris[uri] = f"i{len(self.images)}"
            self.images[reference] = uri
        if key is not None:
            self._keys[key] = reference
        return reference

    def photo(self, image: Image.Image, key: Any = None) -> str:
        return self.add(fit(image, PHOTO_SIDE), PHOTO_QUALITY, key)

    def heat(self, saliency: np.ndarray, shape: tuple[int, int], colormap: str, raw_side: int | None = None) -> str:
        return self.add(heat_image(saliency, shape, colormap, heat_side(raw_side)), HEAT_QUALITY)

    def file(self, path: Path, side: int = 1600, quality: int = 85) -> str:
        """A picture of the run (a chart) by path, downscaled to ``side``; PNG charts become JPEG."""
        try:
            with Image.open(path) as picture:
                picture.load()
                return self.add(fit(picture.convert("RGB"), side), quality, key=("file", str(path)))
        except FileNotFoundError:
            raise RunError(f"{path}: missing (was the run interrupted?)") from None
        except OSError as error:
            raise RunError(f"{path}: cannot be read ({os_reason(error) if error.errno else error})") from None

    @property
    def nbytes(self) -> int:
        return sum(len(value) for value in self.images.values())


def own_file(folder: Path, name: object, where: object) -> Path:
    """``folder / name`` for a file name a run's record gives: a plain name in ``folder``, never
    a path elsewhere (a damaged or crafted record must not pull other files into a report)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise RunError(f"{where}: names no valid file ({name!r})")
    return folder / name


def open_photo(path: Path) -> Image.Image:
    """A photo a run saved (its model view), fully decoded; a RunError if it is missing or damaged."""
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture.convert("RGB")
    except FileNotFoundError:
        raise RunError(f"{path}: missing (was the run interrupted, or made by an older camlens?)") from None
    except OSError as error:
        raise RunError(f"{path}: cannot be read ({os_reason(error) if error.errno else error})") from None


def load_npz(path: Path) -> Mapping[str, np.ndarray]:
    """All arrays of a run's .npz file, read now; a RunError if it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise RunError(f"{path}: missing (was the run interrupted?)") from None
    except Exception as error:  # a truncated zip raises BadZipFile, EOFError, ValueError, ...
        raise RunError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None


def fmt(value: object, digits: int = 3) -> str:
    """A number for a table: ``digits`` significant digits, '-' for missing or not finite."""
    value = number(value)
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def human_size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError  # unreachable


def number(value: object) -> float | None:
    """A finite number read from a run file, else None (missing, NaN, a string, a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def broken_line(points: list[tuple[float, float, str] | None]) -> tuple[list[str], list[dict]]:
    """An SVG line through ``(x, y, label)`` points, broken where a point is None (a missing
    value): its polyline segments ("x,y x,y ...") and its points for markers with a title."""
    segments, current, markers = [], [], []
    for point in points:
        if point is None:
            if current:
                segments.append(" ".join(current))
            current = []
            continue
        x, y, label = point
        current.append(f"{x},{y}")
        markers.append({"x": x, "y": y, "label": label})
    if current:
        segments.append(" ".join(current))
    return segments, markers
