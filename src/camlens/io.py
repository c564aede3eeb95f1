"""Image input and atomic file output: the edges where camlens touches the file system."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CamlensError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Pillow refuses images over twice its bomb limit (about 179 megapixels); camlens says so plainly.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def load_image(path: str | os.PathLike[str], draft_size: int | None = None) -> Image.Image:
    """Read an image file as RGB, fully decoded; transparency is composited on white.

    ``draft_size`` lets a JPEG decode at a reduced scale (down to 1/8) that still covers
    that many pixels on its shorter side: a large photo then decodes in a fraction of the time.
    Raises CamlensError with the file and the reason when it cannot be read.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise CamlensError(f"{path}: no such file")
        if path.is_dir():
            raise CamlensError(f"{path}: is a directory, not an image")
        if not path.is_file():  # a FIFO or a device would block or never end
            raise CamlensError(f"{path}: not a regular file")
    except OSError as error:
        raise CamlensError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise CamlensError(
                        f"{path}: {image.width}x{image.height} is too large to decode "
                        f"(limit {MAX_PIXELS // 1_000_000} megapixels)"
                    )
                if draft_size is not None and image.format == "JPEG":
                    scale = min(image.size) / draft_size
                    if scale >= 2:
                        image.draft("RGB", (image.width / scale, image.height / scale))
                image.load()
                # Photos store their orientation in EXIF: show the model what viewers show.
                return to_rgb(ImageOps.exif_transpose(image))
    except CamlensError:
        raise
    except UnidentifiedImageError:
        raise CamlensError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise CamlensError(f"{path}: too large to decode ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = str(error) or type(error).__name__
        raise CamlensError(f"{path}: corrupt or truncated image ({reason})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any Pillow image; transparent pixels become white, not black."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_8_bit(np.asarray(image), image.mode), mode="L")
    return image.convert("RGB")


def _to_8_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale of 16 or 32 bits, or floats, as 8 bits.

    Floats up to 1 are taken as [0, 1], larger ones as [0, 255]; integers as 16-bit unless
    they exceed that range, then scaled by their maximum.
    """
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    if mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    else:
        scale = 255.0 / (65535.0 if top <= 65535 else top)
    return np.clip(np.nan_to_num(values * scale), 0, 255).astype(np.uint8)


def expand_inputs(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Path]]:
    """Files to explain and files skipped: directories give their image files (by suffix, sorted).

    A file named explicitly is always tried, so a bad one is reported rather than ignored.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    for raw in paths:
        path = Path(raw)
        try:
            is_dir = path.is_dir()
            entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if is_dir else []
        except OSError as error:
            raise CamlensError(f"{path}: cannot be read ({error.strerror or error})") from None
        if is_dir:
            images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
            skipped += [p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
            if not images:
                raise CamlensError(f"{path}: the directory has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += images
        else:
            files.append(path)
    return files, skipped


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".camlens-probe-"):
            pass
    except OSError as error:
        raise CamlensError(f"cannot write to output directory {path}: {error.strerror or error}") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (private) the usual permissions."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())


@contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block succeeds.

    So a reader never finds a half-written file under the final name.
    """
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        publish_mode(Path(temporary))
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(target) as temporary:
        write(temporary)
