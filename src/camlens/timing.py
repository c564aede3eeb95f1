"""Start-up, timed apart: work done once per model, input size or method object (the default
layer's search, the verified inference copy, the model cut at the target layer, a compilation),
so that the per-image time of a method is its steady cost and the order of the methods in a run
does not change their ranking.

The work is timed where it happens (:func:`one_time`), into the running thread's account, which
whoever times a call takes with :func:`take_start_up` and subtracts. All timing reads
:data:`clock` (tests replace it with a clock of their own).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

clock: Callable[[], float] = time.perf_counter

_local = threading.local()


def _account() -> dict[str, float]:
    if not hasattr(_local, "seconds"):
        _local.seconds, _local.depth = {}, 0
    return _local.seconds


@contextlib.contextmanager
def one_time(what: str) -> Iterator[None]:
    """Time this block as start-up work named ``what``; a block inside another is part of it."""
    account = _account()
    _local.depth += 1
    start = clock()
    try:
        yield
    finally:
        _local.depth -= 1
        if _local.depth == 0:
            account[what] = account.get(what, 0.0) + (clock() - start)


def take_start_up() -> dict[str, float]:
    """The start-up seconds this thread spent since the last call, by kind; the account is emptied."""
    account = _account()
    taken = dict(account)
    account.clear()
    return taken
