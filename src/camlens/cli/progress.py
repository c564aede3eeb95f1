"""Progress on stderr: rich's live bar on a terminal, plain dated lines in a log.

rich draws nothing when stderr is not a terminal (CI logs, ``2> file``, a pipe), and a
transient bar still leaves a blank line there. A long run must show in a log too, so there
the same calls print one line per task now and then instead.
"""

from __future__ import annotations

import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .common import console, echo_error, silent

LOG_INTERVAL = 10.0  # seconds between two lines of one task in a log
DONE = float("inf")  # marks a task whose last line has been printed


class LogProgress(Progress):
    """A rich ``Progress`` whose display, off a terminal, is a line per task every
    ``LOG_INTERVAL`` seconds and when the task completes."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        stream = console("stderr")
        # Off a terminal, lines instead of a bar; in a process of a torchrun run other than the
        # first, nothing (the first draws the run's one bar).
        self.logging = not stream.is_terminal and not silent()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        super().__init__(*columns, console=stream, transient=True, disable=self.logging or silent())
        self.interval = interval
        self._logged: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **fields) -> None:
        super().update(task_id, **fields)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if not self.logging:
            return
        task = self._tasks[task_id]
        if not task.visible or task.total is None or task.completed == 0:
            return
        now = time.monotonic()
        last = self._logged.get(task_id)
        finished = task.completed >= task.total
        if finished:
            if last == DONE:
                return
            self._logged[task_id] = DONE
        else:  # a task started again (a new method on the same line) logs afresh
            if last is not None and last != DONE and now - last < self.interval:
                return
            self._logged[task_id] = now
        remaining = task.time_remaining
        eta = "" if finished or remaining is None else f", about {remaining:.0f} s left"
        echo_error(f"{task.description.strip() or 'progress'}: {task.completed:g}/{task.total:g} "
                   f"({task.elapsed or 0:.0f} s{eta})")

