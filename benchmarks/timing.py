"""Helpers shared by the benchmarks: robust timing and a check for CPU contention.

On a small shared machine another process (a test run, a build) can take a core in the middle
of a measurement; with OpenMP's spinning barriers a 2-thread forward then slows down many
times over. :class:`CpuMonitor` measures how many cores *other* processes kept busy during a
measurement (from ``/proc/stat`` minus this process's own CPU time), so that a contended
figure is visible as such instead of silently wrong.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Above this many cores busy with other processes, a timing is flagged as contended.
CONTENTION_LIMIT = 0.10


def _busy_seconds() -> float | None:
    """Seconds of CPU time spent by every process on the machine (None where unknown)."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...
    values = [int(v) for v in fields[1:9]]
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMonitor:
    """Mean number of cores that other processes kept busy between ``start()`` and ``stop()``.

    Use as ``with CpuMonitor() as monitor: ...`` or call ``start``/``stop``; the result is
    ``monitor.other_cores`` (None where ``/proc/stat`` is not available).
    """

    def __init__(self) -> None:
        self.other_cores: float | None = None
        self._busy: float | None = None
        self._own = 0.0
        self._wall = 0.0

    def start(self) -> CpuMonitor:
        self._busy = _busy_seconds()
        self._own = _own_seconds()
        self._wall = time.perf_counter()
        self.other_cores = None
        return self

    def stop(self) -> float | None:
        busy = _busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            other = (busy - self._busy) - (_own_seconds() - self._own)
            # Clock ticks are coarse (10 ms): clamp the rounding noise at zero.
            self.other_cores = max(other, 0.0) / wall
        return self.other_cores

    def __enter__(self) -> CpuMonitor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class Timing:
    """Wall-clock times (seconds) of the timed repeats of one measurement."""

    times: list[float]
    other_cores: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def contended(self) -> bool:
        return self.other_cores is not None and self.other_cores > CONTENTION_LIMIT

    @staticmethod
    def combine(timings: Sequence[Timing]) -> Timing:
        """One Timing from several: all their times; ``other_cores`` weighted by duration."""
        times = [t for timing in timings for t in timing.times]
        known = [(sum(t.times), t.other_cores) for t in timings if t.other_cores is not None]
        duration = sum(d for d, _ in known)
        other = sum(d * o for d, o in known) / duration if known and duration > 0 else None
        return Timing(times, other)

    def as_dict(self) -> dict:
        return {
            "median_s": self.median,
            "min_s": self.best,
            "times_s": self.times,
            "other_cores": self.other_cores,
            "contended": self.contended,
        }


def measure(
    fn: Callable[[], object],
    repeats: int,
    warmup: int = 2,
    warmup_fn: Callable[[], object] | None = None,
) -> Timing:
    """Run ``warmup_fn`` (default ``fn``) ``warmup`` times, then time ``repeats`` calls of ``fn``."""
    for _ in range(warmup):
        (warmup_fn or fn)()
    times = []
    with CpuMonitor() as monitor:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return Timing(times, monitor.other_cores)
