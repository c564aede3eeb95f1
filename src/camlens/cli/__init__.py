"""The ``camlens`` command line: the only place that prints or draws progress bars.

click parses the arguments; rich draws the progress bars and tables. Every user error ends
as one line ``camlens: error: ...`` and a non-zero exit, never a traceback. One module per
command (``explain``, ``evaluate``, ``sanity``, ``report``, ``info``, ``train_ggam``) over a shared core (``common``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from .. import __version__
from ..errors import CamlensError
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
    """Run the command; user errors become one line on stderr and exit code 1 (2 for usage)."""
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

