"""Image input and atomic file output: the edges where camlens touches the file system."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import CamlensError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Pillow refuses images over twice its bomb limit (about 179 megapixels); camlens says so plainly.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as RGB, fully decoded; transparency is composited on white.

    Always a full decode, so that the command line and ``model.preprocess(Image.open(path))``
    give the model the same input. A JPEG's reduced "draft" decoding, measured: down to the
    resize target it changed the model input by up to 99 of 255 levels (a probability by 0.09),
    at 4 times the target or more still by 2 to 5 levels (0.006), and it saved at most 0.2 s
    on a 35-megapixel photo.
    Raises CamlensError with the file and the reason when it cannot be read.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CamlensError(f"{path}: {'broken symbolic link' if path.is_symlink() else 'no such file'}") from None
    except OSError as error:  # a symbolic link loop, a name too long, no permission on a parent folder
        raise CamlensError(f"{path}: cannot be read ({os_reason(error)})") from None
    if stat.S_ISDIR(mode):
        raise CamlensError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        raise CamlensError(f"{path}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise CamlensError(
                        f"{path}: {image.width}x{image.height} is too large to decode "
                        f"(limit {MAX_PIXELS // 1_000_000} megapixels)"
                    )
                image.load()
                return upright_rgb(image)
    except CamlensError:
        raise
    except UnidentifiedImageError:
        raise CamlensError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise CamlensError(f"{path}: too large to decode ({error})") from None
    except OSError as error:
        if error.errno is not None:  # the system's error (permission, I/O), not the decoder's
            raise CamlensError(f"{path}: cannot be read ({os_reason(error)})") from None
        raise CamlensError(f"{path}: corrupt or truncated image ({error or type(error).__name__})") from None
    except (SyntaxError, ValueError, EOFError) as error:
        reason = str(error) or type(error).__name__
        raise CamlensError(f"{path}: corrupt or truncated image ({reason})") from None


def os_reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def upright_rgb(image: Image.Image) -> Image.Image:
    """The image as viewers show it, in RGB: EXIF orientation applied, any mode converted.

    ``Preprocess`` applies it too, so ``model.preprocess(Image.open(path))`` and the command
    line give the model the same pixels; applying it twice changes nothing.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    return to_rgb(image)


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


def expand_inputs(
    paths: Iterable[str | os.PathLike[str]],
) -> tuple[list[Path], list[Path], dict[Path, str]]:
    """Files to explain, files skipped, and folders that could not be listed (with the reason).

    A directory gives its image files (by suffix, sorted; not its sub-folders). A file named
    explicitly is always tried, so a bad one is reported rather than ignored; so is an entry
    with an image suffix that is not a readable file (a broken link, a loop).
    """
    files: list[Path] = []
    skipped: list[Path] = []
    unreadable: dict[Path, str] = {}
    for raw in paths:
        path = Path(raw)
        try:
            if not path.is_dir():
                files.append(path)
                continue
            entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and not p.is_dir())
        except OSError as error:
            unreadable[path] = f"{path}: cannot be read ({os_reason(error)})"
            continue
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise CamlensError(f"{path}: the directory has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += images
    return files, skipped, unreadable


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".camlens-probe-"):
            pass
    except OSError as error:
        raise CamlensError(f"cannot write to output directory {path}: {os_reason(error)}") from None
    return path


LOCK_NAME = ".camlens-lock"
# What a run leaves in the output folder only when it is killed: staging and replaced folders,
# half-written files of atomic_path (".manifest.json.*" is how camlens 0.1 named those).
# Only the lock holder makes these.
LEFTOVER_PATTERNS = (".camlens-staging-*", ".camlens-old-*", ".camlens-partial-*", ".manifest.json.*")


@contextmanager
def locked_output_dir(path: Path):
    """Hold an exclusive lock on an output folder for the whole run, and clear what killed runs left.

    The operating system releases the lock when its holder dies, however it dies; so while we
    hold it, every staging folder present belongs to a dead run.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(path / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CamlensError(
            f"another camlens run is writing to {path}: wait for it to finish, or choose another --out"
        ) from None
    except OSError as error:
        raise CamlensError(f"cannot lock output directory {path}: {os_reason(error)}") from None
    try:
        for pattern in LEFTOVER_PATTERNS:
            for leftover in path.glob(pattern):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with suppress(OSError):
                        leftover.unlink()
        yield path
    finally:
        lock.release()


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
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".camlens-partial-{target.name}.", suffix=target.suffix)
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
