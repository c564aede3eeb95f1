"""``camlens report RUN_DIR``: one self-contained HTML file of a run; and ``--html`` for the
commands that make runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from ..report import build_report
from .common import echo_error, printable


def html_option(command: Callable) -> Callable:
    return click.option("--html", is_flag=True,
                        help="Also write OUT/report.html: one self-contained page of the run to flip "
                             "through and send (see `camlens report`).")(command)


def write_html(out_dir: Path) -> None:
    """The run's report, made by the run itself (which holds its folder's lock); a failure to
    make it is said in one line, and the run's own results stay as they are."""
    from ..errors import CamlensError

    try:
        made = build_report(out_dir, check_lock=False)
    except CamlensError as error:
        echo_error(f"camlens: error: the HTML report could not be made: {error}")
        raise SystemExit(1) from None
    click.echo(f"report: {printable(made.path)} ({made.describe().split(', ')[-1]})")


@click.command(short_help="One self-contained HTML file of a run, to flip through and send.")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--out", metavar="FILE", help="Where to write it (default: RUN_DIR/report.html).")
def report(run_dir: str, out: str | None) -> None:
    """One self-contained HTML report of the run in RUN_DIR (made by explain, evaluate, sanity or
    train-ggam): pictures embedded, no network, written whole or not at all."""
    made = build_report(Path(run_dir), Path(out) if out else None)
    click.echo(made.describe())
