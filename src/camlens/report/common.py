"""What every kind of report shares: reading a run folder safely, the image store, the templates.

Images are stored once: each is encoded one time (JPEG, downscaled) into a JSON object of the
page, keyed by a short reference; the page's script gives every ``<img data-ref=...>`` its
source from there, so a photo shown beside several maps, or a map shown in two panels, is in
the file once.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import CamlensError
from ..io import MAX_NPZ_BYTES, Arrays, read_plain

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


# The run folder a report is being made of: every file it reads must lie in it, reached through
# no symbolic link (one could pull a picture from elsewhere into a report meant to be sent).
RUN_ROOT: ContextVar[Path | None] = ContextVar("RUN_ROOT", default=None)
MAX_JSON_BYTES = 2**26
MAX_JSONL_BYTES = 2**31
MAX_PICTURE_BYTES = 2**26
MAX_PICTURE_PIXELS = 40_000_000  # views and charts camlens writes are far smaller


def read_run_file(path: Path, limit: int, digest: object = None) -> bytes:
    """The bytes of a file of the run being reported: inside its folder, through no link, a
    regular file of at most ``limit`` bytes, and with ``digest`` ("sha256:<hex>", as the run's
    record gives it) the very file the record describes; a RunError that says which file and why
    otherwise."""
    root = RUN_ROOT.get()
    if root is not None:
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            raise RunError(f"{path}: outside the run folder {root}, never read into its report") from None
        current = root
        for part in parts:
            current = current / part
            if current.is_symlink():
                raise RunError(f"{current}: a symbolic link; a report never follows a link in a run folder (it "
                               "could embed a file from elsewhere): remove it, or run the command again")
    try:
        data = read_plain(path, limit)
    except CamlensError as error:
        message = str(error)
        if message.endswith(": missing"):
            message += " (was the run interrupted?)"
        raise RunError(message) from None
    if digest is not None and digest != f"sha256:{hashlib.sha256(data).hexdigest()}":
        raise RunError(f"{path}: not the file the run's record describes (a later run was stopped while "
                       "replacing the run's files?): run the command again")
    return data


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a run, or a RunError that says which file and why."""
    data = read_run_file(path, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise RunError(f"{path}: not a valid {what} (is the run folder damaged? {error})") from None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and the number of lines that could not be read (a run
    killed while writing leaves its last line cut)."""
    records, bad = [], 0
    text = read_run_file(path, MAX_JSONL_BYTES).decode("utf-8", "replace")
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def read_picture(path: Path, digest: object = None) -> Image.Image:
    """A picture of the run (a view, a chart), fully decoded; a RunError if it is missing, a link,
    damaged, larger than camlens writes, or not the one of ``digest`` (see :func:`read_run_file`)."""
    data = read_run_file(path, MAX_PICTURE_BYTES, digest)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as picture:
                if picture.width * picture.height > MAX_PICTURE_PIXELS:
                    raise RunError(f"{path}: {picture.width}x{picture.height} pixels, more than camlens writes")
                picture.load()
                return picture.convert("RGB")
    except RunError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise RunError(f"{path}: cannot be read ({error or type(error).__name__})") from None


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


def colour_bar(colormap: str, width: int = 256, height: int = 12) -> Image.Image:
    """The scale of the maps: ``colormap`` from 0 (left) to 1 (right)."""
    from ..render import colorize

    return Image.fromarray(colorize(np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1)), colormap))


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
        key = ("file", str(path))
        if key in self._keys:
            return self._keys[key]
        return self.add(fit(read_picture(path), side), quality, key=key)

    @property
    def nbytes(self) -> int:
        return sum(len(value) for value in self.images.values())


def own_file(folder: Path, name: object, where: object) -> Path:
    """``folder / name`` for a file name a run's record gives: a plain name in ``folder``, never
    a path elsewhere (a damaged or crafted record must not pull other files into a report)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise RunError(f"{where}: names no valid file ({name!r})")
    return folder / name


def open_photo(path: Path, digest: object = None) -> Image.Image:
    """A photo a run saved (its model view), fully decoded; a RunError if it is missing or damaged."""
    return read_picture(path, digest)


def load_npz(path: Path, digest: object = None) -> Arrays:
    """The arrays of a run's .npz file, each read when used and bounded in size (see
    :class:`camlens.io.Arrays`); a RunError if the file is missing, a link, or damaged."""
    data = read_run_file(path, MAX_NPZ_BYTES, digest)
    try:
        return _Arrays(path, data=data)
    except CamlensError as error:
        raise RunError(str(error)) from None


class _Arrays(Arrays):
    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return super().__getitem__(name)
        except CamlensError as error:
            raise RunError(str(error)) from None

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return super().shape(name)
        except CamlensError as error:
            raise RunError(str(error)) from None


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
