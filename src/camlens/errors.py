"""The one exception type camlens raises for errors a user can cause."""

from __future__ import annotations


class CamlensError(Exception):
    """A problem with the model, the input or the options, with a message that says what to do.

    The command line prints the message alone (no traceback) and exits non-zero.
    """
