"""The one exception type camlens raises for errors a user can cause."""

from __future__ import annotations


class CamlensError(Exception):
    """A problem with the model, the input or the options, with a message that says what to do.

    The command line prints the message alone (no traceback) and exits non-zero.
    """


class BlankMapWarning(UserWarning):
    """Some maps came back blank (zero everywhere): the message names the images and targets and
    says why. ``Explanation.blank`` flags them; ``Explanation.blank_reasons()`` gives the reasons."""


class BatchHalvedWarning(UserWarning):
    """A method ran out of memory (CUDA) with its ``batch_size``: its batches were halved until the
    work fitted, and stay so for its later calls. The numbers do not depend on the batch size."""


def first_line(error: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_positive_int(name: str, value: object) -> None:
    """Refuse anything but an integer >= 1 (a bool is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CamlensError(f"{name} must be a positive integer, got {value!r}")
