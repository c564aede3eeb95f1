"""``camlens report``: one self-contained HTML file of a run, to flip through and send.

Each kind of run (explain, evaluate, sanity, train-ggam) has a module with ``load(folder,
store)``, which reads the run into the context of its Jinja2 template ``<kind>.html.j2``; the
templates extend ``base.html.j2``, which holds the page's styles and script. Nothing is
fetched when the page opens: styles, script and images are all in the file.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import CamlensError
from ..io import LOCK_NAME, RunFolder, os_reason, read_marker, write_atomic
from .common import RUN_ROOT, ImageStore, RunError, human_size

__all__ = ["Report", "RunError", "build_report", "detect_kind", "render_report"]

# Which file says what kind of run a folder holds, in the order they are looked for.
KINDS = (
    ("sanity", "sanity.json"),
    ("train_ggam", "train.json"),
    ("evaluate", "config.json"),
    ("explain", "manifest.json"),
)


@dataclass
class Report:
    path: Path
    kind: str
    bytes: int
    images: int
    status: str

    def describe(self) -> str:
        state = "" if self.status == "complete" else f" ({self.status} run)"
        return f"{self.path}: {self.kind.replace('_', '-')} report{state}, {self.images} pictures, {human_size(self.bytes)}"


def detect_kind(folder: Path) -> str:
    """The kind of run in ``folder``, or a RunError that says why it is not one."""
    if not folder.exists():
        raise RunError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise RunError(f"{folder}: not a directory (give the folder a camlens command wrote its run into)")
    for kind, name in KINDS:
        if (folder / name).is_file():
            return kind
    if any(folder.glob("*/.camlens")):
        return "explain"  # an explain run killed before it wrote its manifest
    if (folder / "results.jsonl").is_file():
        raise RunError(f"{folder}: results.jsonl without config.json: not an evaluate run of camlens 0.3 or later")
    raise RunError(f"{folder}: not a camlens run folder (none of manifest.json, config.json, sanity.json, train.json)")


def _running(folder: Path) -> bool:
    """Whether a camlens run holds the folder's lock now (it is still writing)."""
    from filelock import FileLock, Timeout

    if not (folder / LOCK_NAME).exists():
        return False
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("camlens.report", "templates"),
        autoescape=select_autoescape(["html", "j2"], default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    from .common import fmt

    env.filters["fmt"] = fmt
    return env


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8, undecodable bytes of a file name (lone surrogates) as U+FFFD."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode("utf-8")
        except UnicodeEncodeError:
            return text.encode("utf-8", "replace")


# An absolute POSIX path of two parts or more, not inside a word, a number or a URL.
_ABSOLUTE = re.compile(r"(?<![\w.:/~+=-])/(?:[^\s/\"'<>|]+/)+[^\s/\"'<>|,;)]*")


def private(value: object, folder: Path) -> object:
    """``value`` (a report's context: dicts, lists, strings) with every absolute local path in its
    strings shown relative to the run ``folder`` where it is inside it, else as ``.../<its name>``:
    a report meant to be mailed tells no one the user's name or folder layout. The run's JSON files
    keep the full paths."""
    root = str(folder.resolve())

    def shown(match: re.Match) -> str:
        path = match.group(0)
        for base in (root, str(folder)):
            if path == base:
                return folder.resolve().name
            if path.startswith(base.rstrip("/") + "/"):
                return path[len(base.rstrip("/")) + 1:]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return f".../{name}" if name else "..."

    if isinstance(value, str):
        if value.startswith("/") and "\n" not in value and len(value) > 1:  # a whole path: spaces and all
            return shown(re.match(r".*", value, re.S))
        return _ABSOLUTE.sub(shown, value)
    if isinstance(value, dict):
        return {key: private(item, folder) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(private(item, folder) for item in value)
    return value


def render_report(folder: Path) -> tuple[str, str, ImageStore, dict]:
    """The HTML of ``folder``'s report, its kind, its image store and its context."""
    kind = detect_kind(folder)
    module = importlib.import_module(f".{kind}", __name__)  # report/<kind>.py
    store = ImageStore()
    from jinja2 import UndefinedError

    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():  # never followed: a report of links could embed any local file
            raise RunError(f"{entry}: a symbolic link; a report never follows a link in a run folder (it could "
                           "embed a file from elsewhere): remove it, or run the command again")
    reading = RUN_ROOT.set(folder)
    try:
        context = module.load(folder, store)
        context.setdefault("status", "complete")
        context.setdefault("notes", [])
        # A report is meant to be sent: no absolute local path in it (the user's name, their folders).
        context = private(context, folder)
        template = environment().get_template(f"{kind}.html.j2")
        html = template.render(
            **context,
            images_store=store.images,
            version=__version__,
            generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # The run folder by its name only; one of undecodable bytes (surrogate escapes) cannot go
            # into a UTF-8 file.
            run_folder=_utf8(folder.resolve().name or str(folder)).decode("utf-8"),
        )
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, UndefinedError) as error:
        # A run file edited or damaged into values of the wrong type (a list where a mapping
        # belongs, null for a number): one line that says so, not a traceback.
        raise RunError(f"{folder}: the run's files hold values this camlens does not expect "
                       f"(damaged or edited? {type(error).__name__}: {error})") from None
    finally:
        RUN_ROOT.reset(reading)
    return html, kind, store, context


def _own_in_run(folder: Path, target: Path) -> None:
    """A report written into its own run folder is recorded there as camlens's; one of that name
    that camlens did not write is never replaced."""
    try:
        inside = target.parent.resolve() == folder.resolve()
    except OSError:
        return
    if not inside:
        return
    try:
        record = read_marker(folder)
    except CamlensError as error:
        raise RunError(str(error)) from None
    if record is None:
        return
    run = RunFolder(folder, record["kind"], record)
    if (target.exists() or target.is_symlink()) and not run.owns(target.name):
        raise RunError(f"cannot write {target}: camlens did not write the file of that name there (give another "
                       "--out, or remove it first)")
    try:
        run.own(target.name)
    except OSError as error:
        raise RunError(f"cannot write {target}: {os_reason(error)}") from None


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 *, check_lock: bool = True) -> Report:
    """Write the report of the run in ``run_dir`` to ``out`` (default ``run_dir/report.html``),
    atomically: the file is either the whole report or not there.

    ``check_lock=False`` is for the run itself (``--html``), which holds the folder's lock.
    """
    folder = Path(run_dir)
    if check_lock and folder.is_dir() and _running(folder):
        raise RunError(f"{folder}: a camlens run is writing to it now; make the report when it has finished")
    html, kind, store, context = render_report(folder)
    target = Path(out) if out is not None else folder / "report.html"
    if target.is_dir():
        target = target / "report.html"
    if target.exists() and target.suffix.lower() not in (".html", ".htm"):
        # `--out RUN/manifest.json` or a photo by a slip of the keyboard: never replace a file
        # that is not a web page.
        raise RunError(f"cannot write {target}: it exists and is not an .html file (give a name "
                       "ending in .html, or remove it first)")
    if not target.parent.is_dir():
        raise RunError(f"cannot write {target}: {target.parent} is not a directory")
    _own_in_run(folder, target)
    # Names from the run (image files, classes) may carry undecodable bytes as lone surrogates:
    # they are shown as replacement characters rather than failing the whole report.
    data = _utf8(html)
    try:
        write_atomic(target, lambda path: path.write_bytes(data))
    except OSError as error:
        raise RunError(f"cannot write {target}: {os_reason(error)}") from None
    return Report(target, kind, len(data), len(store.images), context["status"])
