"""Image input and atomic file output: the edges where camlens touches the file system."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import CamlensError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Pillow refuses images over twice its bomb limit (about 179 megapixels); camlens says so plainly.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


# Arrays that camlens explain takes as a model's input as it is: signals (C, L), volumes and
# clips (C, D, H, W), or preprocessed images (C, H, W); one input per file.
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
MAX_INPUT_ARRAY_BYTES = 2**30  # an input array's data, and a .npz file holding one


def is_array_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in ARRAY_SUFFIXES


def _regular_file(path: Path, kind: str) -> None:
    """A CamlensError unless ``path`` is a regular file that can be looked at (links followed:
    a file the user names may be one)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CamlensError(f"{path}: {'broken symbolic link' if path.is_symlink() else 'no such file'}") from None
    except OSError as error:  # a symbolic link loop, a name too long, no permission on a parent folder
        raise CamlensError(f"{path}: cannot be read ({os_reason(error)})") from None
    if stat.S_ISDIR(mode):
        raise CamlensError(f"{path}: is a directory, not {kind}")
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        raise CamlensError(f"{path}: not a regular file")


def _npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` from a .npy stream's header, read up to its data (nothing of the data)."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream)
    return shape, dtype


def load_array(path: str | os.PathLike[str]) -> np.ndarray:
    """One model input from a ``.npy`` file, or from the one array of a ``.npz`` file: (C, L) for
    a signal, (C, H, W) for a preprocessed image, (C, D, H, W) for a volume or a clip, of real
    numbers, all finite. Read as a hostile file: its header is checked before any data is read
    (nothing unpickled, no more data than the file holds, at most ``MAX_INPUT_ARRAY_BYTES``).
    Returned as float64 where it is float64, else float32. A CamlensError names the file and why."""
    path = Path(path)
    _regular_file(path, "an array")
    try:
        if path.stat().st_size > MAX_INPUT_ARRAY_BYTES:
            raise CamlensError(f"{path}: larger than {MAX_INPUT_ARRAY_BYTES >> 20} MiB, more than camlens reads "
                               "as one input")
        data = path.read_bytes()
    except OSError as error:
        raise CamlensError(f"{path}: cannot be read ({os_reason(error)})") from None
    if path.suffix.lower() == ".npz":
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError, EOFError) as error:
            raise CamlensError(f"{path}: not a .npz file ({error})") from None
        members = [info for info in archive.infolist() if info.filename.endswith(".npy")]
        if len(members) != 1:
            names = ", ".join(info.filename[:-4] for info in members[:5]) or "none"
            raise CamlensError(f"{path}: holds {len(members)} arrays ({names}); camlens takes one input per file: "
                               "save each input in a file of its own")
        opened, declared = (lambda: archive.open(members[0])), members[0].file_size
    else:
        opened, declared = (lambda: io.BytesIO(data)), len(data)
    try:
        with opened() as stream:
            shape, dtype = _npy_header(stream)
            room = declared - stream.tell()
        if dtype.hasobject or dtype.kind not in "biuf":
            raise CamlensError(f"{path}: holds {dtype} values; an input is real numbers (bool, int or float)")
        size = math.prod(shape) * dtype.itemsize
        if size > room:
            raise CamlensError(f"{path}: declares {size} bytes of data but holds {room} (damaged)")
        if size > MAX_INPUT_ARRAY_BYTES:
            raise CamlensError(f"{path}: {size} bytes of data, more than camlens reads as one input")
        with opened() as stream:
            array = np.lib.format.read_array(stream, allow_pickle=False)
    except CamlensError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as error:
        raise CamlensError(f"{path}: cannot be read as an array ({error})") from None
    if not 2 <= array.ndim <= 4 or array.size == 0:
        raise CamlensError(f"{path}: an array of shape {array.shape}; an input is one signal (C, L), image (C, H, W), "
                           "volume or clip (C, D, H, W), channels first, without a batch dimension")
    array = array.astype(np.float64 if array.dtype == np.float64 else np.float32)
    if not np.isfinite(array).all():
        raise CamlensError(f"{path}: holds NaN or infinite values")
    return array


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
    _regular_file(path, "an image")
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


def file_digest(path: str | os.PathLike[str]) -> str:
    """"sha256:<hex>" of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise CamlensError(f"{path}: cannot be read ({os_reason(error)})") from None
    return f"sha256:{digest.hexdigest()}"


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
    paths: Iterable[str | os.PathLike[str]], suffixes: frozenset[str] = IMAGE_SUFFIXES,
) -> tuple[list[Path], list[Path], dict[Path, str]]:
    """Files to explain, files skipped, and paths that could not be read: missing files, broken
    links and folders that could not be listed (with the reason).

    A directory gives its files of ``suffixes`` (sorted; not its sub-folders). A file named
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
                if not path.exists():  # known now: a run with nothing to read makes no output folder
                    unreadable[path] = f"{path}: {'broken symbolic link' if path.is_symlink() else 'no such file'}"
                else:
                    files.append(path)
                continue
            entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and not p.is_dir())
        except OSError as error:
            unreadable[path] = f"{path}: cannot be read ({os_reason(error)})"
            continue
        images = [p for p in entries if p.suffix.lower() in suffixes]
        skipped += [p for p in entries if p.suffix.lower() not in suffixes]
        if not images:
            kind = "image files" if suffixes == IMAGE_SUFFIXES else "image or array files"
            raise CamlensError(f"{path}: the directory has no {kind} ({', '.join(sorted(suffixes))})")
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


RUN_MARKER = ".camlens-run.json"  # in every output folder camlens made: what kind of run, what it wrote
MAX_MARKER_BYTES = 4 * 2**20


class RunFolder:
    """An output folder that camlens owns, and the only files in it that camlens may replace.

    Its marker, ``.camlens-run.json``, names the kind of run (explain, evaluate, sanity,
    train-ggam), an id of its own, and every entry camlens wrote in it; an entry is recorded
    before it is first written, so a run killed half-way still owns what it left. camlens
    writes only into a new or empty folder or one of its own of the same kind, removes and
    replaces only what the marker lists, and never follows a symbolic link in the folder: any
    other content is refused in one line before any work (:meth:`claim`).
    """

    def __init__(self, path: Path, kind: str, record: dict) -> None:
        self.path = path
        self.kind = kind
        self.record = record

    @classmethod
    def claim(cls, path: Path, kind: str, files: Iterable[str] = ()) -> RunFolder:
        """The folder ``path`` as a run folder of ``kind``: made a new one where it is empty, the
        one recorded where camlens made it for the same kind; a CamlensError otherwise. ``files``:
        the names a run of this kind always writes, recorded as camlens's at once."""
        record = read_marker(path)
        if record is not None and record["kind"] != kind:
            raise CamlensError(f"{path} holds a camlens {record['kind']} run, not a {kind} run: choose another --out")
        owned = set(record["files"]) if record is not None else set()
        strangers, links = [], []
        try:
            entries = sorted(path.iterdir())
        except OSError as error:
            raise CamlensError(f"cannot read output directory {path}: {os_reason(error)}") from None
        for entry in entries:
            # The marker, the lock, temporaries of camlens; and hidden files (.DS_Store), which no
            # camlens name can replace, left as they are, never read.
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                links.append(entry.name)
            elif entry.name not in owned:
                strangers.append(entry.name)
        if links:
            raise CamlensError(
                f"{path / links[0]} is a symbolic link: camlens never follows a link in its output folder "
                "(it could read or write outside it); remove it or choose another --out"
            )
        if strangers:
            shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
            why = "" if record is not None else " (it has no record of a camlens run; camlens 0.3 kept none)"
            raise CamlensError(
                f"{path} holds files camlens did not write{why}: {shown}; camlens writes only into a new or empty "
                f"folder or one of its own {kind} runs, and never replaces a file it cannot prove it wrote: "
                "choose another --out"
            )
        if record is None:
            record = {"kind": kind, "id": uuid.uuid4().hex, "files": []}
        record["files"] = sorted({*record["files"], *files})
        folder = cls(path, kind, record)
        folder._save()
        return folder

    def own(self, name: str) -> Path:
        """``self.path / name``, recorded as camlens's before it is first written."""
        self.own_all([name])
        return self.path / name

    def own_all(self, names: Iterable[str]) -> None:
        """Record ``names`` as camlens's at once, before any is written: the processes of a run of
        several write into names the first one recorded (:meth:`forget` the ones left unwritten)."""
        new = set(names) - set(self.record["files"])
        if new:
            # What another writer under the same lock recorded (the report of --html) is kept.
            on_disk = read_marker(self.path) or {"files": []}
            self.record["files"] = sorted({*self.record["files"], *on_disk["files"], *new})
            self._save()

    def forget(self, names: Iterable[str]) -> None:
        """No longer record ``names`` (recorded by :meth:`own_all`) where nothing of theirs exists:
        a name camlens never wrote is not its to replace later."""
        gone = {name for name in names if not (self.path / name).exists() and not (self.path / name).is_symlink()}
        if gone & set(self.record["files"]):
            self.record["files"] = sorted(set(self.record["files"]) - gone)
            self._save()

    def owns(self, name: str) -> bool:
        return name in self.record["files"]

    def remove(self, name: str) -> None:
        """Remove ``name`` where camlens wrote it (a file or a link, never a link's target);
        anything else of that name is left alone."""
        if self.owns(name):
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with suppress(FileNotFoundError):
                    target.unlink()

    def write(self, name: str, write: Callable[[Path], None]) -> None:
        """Write ``name`` atomically, as camlens's (a link of that name is replaced, never followed)."""
        write_atomic(self.own(name), write)

    def _save(self) -> None:
        text = json.dumps(self.record, indent=1) + "\n"
        write_atomic(self.path / RUN_MARKER, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_marker(path: Path) -> dict | None:
    """The run folder record of ``path``, None where there is none; a CamlensError where it is
    damaged or is not a plain file (camlens reads nothing through a link in a run folder)."""
    marker = path / RUN_MARKER
    if not marker.exists() and not marker.is_symlink():
        return None
    try:
        record = json.loads(read_plain(marker, MAX_MARKER_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("kind"), str) and isinstance(record.get("id"), str)
            and isinstance(record.get("files"), list) and all(isinstance(f, str) for f in record["files"])):
        raise CamlensError(f"{marker} is damaged, so what camlens wrote in {path} is unknown: choose another --out")
    return record


def read_plain(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes opened without following
    a symbolic link; a CamlensError otherwise (a link, a FIFO, a device, a file too large)."""
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CamlensError(f"{path}: a symbolic link, which camlens does not follow in a run folder") from None
        if error.errno == errno.ENOENT:
            raise CamlensError(f"{path}: missing") from None
        raise CamlensError(f"{path}: cannot be read ({os_reason(error)})") from None
    with os.fdopen(handle, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CamlensError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise CamlensError(f"{path}: {info.st_size} bytes, more than a camlens run writes there ({limit})")
        data = file.read(info.st_size + 1)  # not limit + 1: read(n) allocates n bytes at once
        while len(data) <= limit and (more := file.read(2**20)):  # a file that grew since fstat
            data += more
    if len(data) > limit:
        raise CamlensError(f"{path}: more than {limit} bytes, more than a camlens run writes there")
    return data


MAX_NPZ_BYTES = 2**30  # a run's .npz file, compressed
MAX_ARRAY_BYTES = 2**28  # one array of it, decompressed


class Arrays(Mapping):
    """The arrays of a run's ``.npz`` file, each read (decompressed) only when asked for, after
    its declared size is checked: a crafted file of a few MB that would decompress to GBs, or an
    array header that declares more than its data holds, is refused, not allocated. The file is
    read without following a link; nothing is unpickled.
    """

    def __init__(self, path: Path, limit: int = MAX_ARRAY_BYTES, data: bytes | None = None) -> None:
        self.path = path
        self.limit = limit
        try:
            self._zip = zipfile.ZipFile(io.BytesIO(read_plain(path, MAX_NPZ_BYTES) if data is None else data))
        except (zipfile.BadZipFile, ValueError, EOFError) as error:
            raise CamlensError(f"{path}: cannot be read (not a .npz file camlens wrote: {error})") from None
        self._members = {info.filename[:-4]: info for info in self._zip.infolist() if info.filename.endswith(".npy")}

    def __iter__(self):
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, name: str) -> np.ndarray:
        self._header(name)  # bounds what numpy allocates before it reads the data
        try:
            with self._zip.open(self._members[name]) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as error:
            raise CamlensError(f"{self.path}: array {name!r} cannot be read ({error})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The array's shape, from its header alone."""
        return self._header(name, bounded=False)

    def _header(self, name: str, bounded: bool = True) -> tuple[int, ...]:
        """The array's shape, once its header is checked: no Python objects, no more data declared
        than the member holds, and (``bounded``) at most ``limit`` bytes."""
        info = self._members[name]
        if info.file_size > self.limit and bounded:
            raise CamlensError(f"{self.path}: array {name!r} would take {info.file_size} bytes, more than a camlens "
                               f"run writes ({self.limit})")
        try:
            with self._zip.open(info) as member:
                shape, dtype = _npy_header(member)
                header = member.tell()
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as error:
            raise CamlensError(f"{self.path}: array {name!r} cannot be read ({error})") from None
        if dtype.hasobject:
            raise CamlensError(f"{self.path}: array {name!r} holds Python objects, which camlens never loads")
        if math.prod(shape) * dtype.itemsize > info.file_size - header:
            raise CamlensError(f"{self.path}: array {name!r} declares more data than the file holds (damaged)")
        return shape


@contextmanager
def locked_output_dir(path: Path, kind: str, files: Iterable[str] = ()):
    """Hold an exclusive lock on an output folder for the whole run, clear what killed runs left,
    and yield it as a :class:`RunFolder` of ``kind`` (refused in one line where it is not one;
    ``files``: see :meth:`RunFolder.claim`).

    The operating system releases the lock when its holder dies, however it dies; so while we
    hold it, every staging folder present belongs to a dead run.
    """
    from filelock import FileLock, Timeout

    if (path / LOCK_NAME).is_symlink():
        raise CamlensError(f"{path / LOCK_NAME} is a symbolic link: camlens never follows a link in its output "
                           "folder (it could write outside it); remove it or choose another --out")
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
        yield RunFolder.claim(path, kind, files)
    finally:
        lock.release()


def held_output_dir(stack: ExitStack, out: str | os.PathLike[str], kind: str, files: Iterable[str] = ()) -> RunFolder:
    """The output folder ``out`` of a run of ``kind``: made if needed, locked for the rest of
    ``stack`` (:func:`locked_output_dir`), without an earlier run's report (which is not this
    run's)."""
    folder = stack.enter_context(locked_output_dir(ensure_writable_dir(out), kind, files))
    folder.remove("report.html")
    return folder


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
