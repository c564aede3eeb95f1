"""The ``camlens`` command line: the only place that prints or draws progress bars.

click parses the arguments; rich draws the progress bars and tables. Every user error ends
as one line ``camlens: error: ...`` and a non-zero exit, never a traceback. One module per
command (``explain``, ``evaluate``, ``sanity``, ``report``, ``info``, ``train_ggam``) over a shared core (``common``).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Sequence

import click

from .. import __version__
from ..errors import BatchHalvedWarning, BlankMapWarning, CamlensError
from ..io import os_reason
from .common import echo_error
from .evaluate import evaluate
from .explain import explain
from .info import layers, methods
from .report import report
from .sanity import sanity
from .train_ggam import train_ggam_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="camlens")
def cli() -> None:
    """camlens: what a convolutional network looks at when it decides."""


for command in (explain, evaluate, sanity, report, layers, methods, train_ggam_command):
    cli.add_command(command)



def main(argv: Sequence[str] | None = None) -> None:
    """Run the command; user errors become one line on stderr and exit code 1 (2 for usage).
    Warnings of the libraries underneath (torch's on an exported model, matplotlib's on a glyph
    its font lacks) are summarised in one line at the end of a run that succeeded, not printed
    with their source lines."""
    if sys.warnoptions:  # the user chose how warnings show (-W, PYTHONWARNINGS): as they chose
        _run(argv)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once per place, as Python shows them
        try:
            _run(argv)
        except SystemExit as done:
            if done.code not in (0, None):  # an error is its own one line: warnings are no news then
                raise
        for line in halving_notes(caught):  # this process's own, said by each process of a run of several
            echo_error(line, every_process=True)
        for line in warning_notes(caught):
            echo_error(line)


GLYPH = re.compile(r"Glyph \d+ \(.*\) missing from font\(s\) (.+)\.")


def halving_notes(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """A note for each batch size a method halved after running out of memory, once each."""
    said = dict.fromkeys(str(item.message) for item in caught if issubclass(item.category, BatchHalvedWarning))
    return [f"camlens: note: {text}" for text in said]


def warning_notes(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """One line for the characters no font could draw, one for the other warnings."""
    glyphs: dict[str, str] = {}
    others: list[str] = []
    for item in caught:
        if issubclass(item.category, BlankMapWarning):  # each command says which maps are blank itself
            continue
        if issubclass(item.category, BatchHalvedWarning):  # said by halving_notes
            continue
        text = str(item.message)
        found = GLYPH.match(text)
        if found:
            glyphs.setdefault(text.split(" ")[1], found.group(1))
            continue
        line = f"{item.category.__name__}: {(text.strip().splitlines() or [''])[0]}"
        if line not in others:
            others.append(line)
    notes = []
    if glyphs:
        shown = "".join(chr(int(code)) for code in glyphs)
        notes.append(f"camlens: note: the font ({', '.join(sorted(set(glyphs.values())))}) has no glyph for "
                     f"{len(glyphs)} character(s) of the names in the figures ({shown}): drawn as boxes there")
    if others:
        first = others[0] if len(others[0]) <= 200 else others[0][:199] + "…"
        more = f"; and {len(others) - 1} more" if len(others) > 1 else ""
        notes.append(f"camlens: note: a library warned ({first}{more}); PYTHONWARNINGS=default shows each with "
                     "its source")
    return notes


def _run(argv: Sequence[str] | None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="camlens", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else cli.get_help(click.Context(cli)))
        sys.exit(0)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        echo_error("camlens: interrupted")
        sys.exit(130)
    except click.UsageError as error:
        where = error.ctx.command_path if error.ctx else "camlens"
        echo_error(f"camlens: error: {error.format_message()} (see {where} --help)")
        sys.exit(2)
    except click.ClickException as error:
        echo_error(f"camlens: error: {error.format_message()}")
        sys.exit(error.exit_code)
    except CamlensError as error:
        echo_error(f"camlens: error: {error}")
        sys.exit(1)
    except KeyboardInterrupt:
        echo_error("camlens: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as error:  # the file system failed mid-run (disk full, permissions changed)
        where = f"{error.filename}: " if error.filename else ""
        echo_error(f"camlens: error: {where}{os_reason(error)}")
        sys.exit(1)


if __name__ == "__main__":
    main()

