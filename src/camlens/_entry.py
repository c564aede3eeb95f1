"""The console script's entry point, light enough to catch Ctrl-C while torch is imported."""

from __future__ import annotations

import os
import sys


def main() -> None:
    # A closed stdout or stderr (``camlens ... >&-``) must not crash the first print.
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    try:
        from .cli import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("camlens: interrupted\n")
        sys.exit(130)
