"""Runs over a dataset on 1..N processes started by ``torchrun``: who does which image, and how
the processes agree. torch.distributed is the engine; camlens adds no scheduler of its own.

``torchrun`` starts N copies of a command and tells each its place (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) and where to meet (``MASTER_ADDR``, ``MASTER_PORT``). :func:`join` joins that
group (gloo: the processes only exchange small messages, on a CPU or a GPU machine alike) and
returns a :class:`Group`; without ``torchrun`` (or with one process) it returns the group of one
process, whose every operation is the plain single-process one, so that a runner is written once.

Work is handed out by :class:`WorkQueue`: one unit (an image) at a time, from a counter in the
group's key-value store (the rendezvous's TCPStore, incremented atomically by ``store.add``). A
process that finishes a unit takes the next one, so a process given slow images (Score-CAM's
cost depends on the image) does not hold the others up, and every unit is taken exactly once.
A shared count of the finished work lets the first process (rank 0) draw one progress bar for
the whole run. Training shares each batch instead (:meth:`Group.share`,
:meth:`Group.parallel`: PyTorch's ``DistributedDataParallel``).
"""

from __future__ import annotations

import atexit
import datetime
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CamlensError, first_line

# Collective calls (a barrier, a broadcast) wait at most this long for the slowest process. The
# processes meet only at the start and the end of a run, and between the two every one is busy:
# a process that finished waits for the others' last unit, one image of work.
TIMEOUT = datetime.timedelta(hours=6)
POLL = 0.2  # seconds between two looks at the shared counters while waiting for the others


class PeerFailed(SystemExit):
    """Another process of the run failed before this one could start: it said why, this one exits
    quietly (one line for the run, not one per process)."""

    def __init__(self) -> None:
        super().__init__(1)


@dataclass
class Group:
    """The processes of one run. ``rank`` 0 is the one that reads and writes the shared files,
    asks and prints; ``world`` processes in all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    store: Any = None  # torch.distributed.Store where world > 1
    prefix: str = ""  # this run's keys in the store
    _counters: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``
        (one GPU a process); any other device is every process's."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def from_main(self, work: Callable[[], Any]) -> Any:
        """``work()`` run by rank 0 alone, its result given to every process. Where it raises, rank 0
        raises (and says why); the others exit quietly (:class:`PeerFailed`)."""
        if not self.distributed:
            return work()
        outcome: list[Any] = [None]
        error = None
        if self.main:
            try:
                outcome = [("ok", work())]
            except BaseException as raised:  # the others must not wait for a result that never comes
                error = raised
                outcome = [("failed", None)]
        torch.distributed.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
        status, value = outcome[0]
        if status != "ok":
            raise PeerFailed()
        return value

    # -- data-parallel training ---------------------------------------------------------------
    def share(self, index: torch.Tensor) -> torch.Tensor:
        """This process's share of a batch of indices: every ``world``-th one, from its rank."""
        return index[self.rank :: self.world]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes; every process gets the sum."""
        if not self.distributed:
            return values
        values = values.clone()
        torch.distributed.all_reduce(values)
        return values

    def parallel(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` for a training step of every process on its share of the batch
        (``DistributedDataParallel``: the gradients of the processes averaged before the step), or
        ``module`` itself in a run of one process."""
        if not self.distributed:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    # -- the shared counters ------------------------------------------------------------------
    def add(self, name: str, amount: int) -> int:
        """Add ``amount`` to the counter ``name`` (shared by the processes) and return its value."""
        if not self.distributed:
            self._counters[name] = self._counters.get(name, 0) + amount
            return self._counters[name]
        return int(self.store.add(f"{self.prefix}/{name}", amount))

    def collect(self, value: Any) -> list[Any] | None:
        """Every process's ``value``, by rank, on rank 0 (None on the others). Each process calls
        it once its own work is done; rank 0 waits for the last one."""
        if not self.distributed:
            return [value]
        values: list[Any] | None = [None] * self.world if self.main else None
        torch.distributed.gather_object(value, values, dst=0)
        return values


class WorkQueue:
    """Units ``0 .. size - 1`` handed out one at a time to whichever process asks next: each unit
    goes to exactly one process of the run."""

    def __init__(self, group: Group, name: str, size: int) -> None:
        self.group, self.name, self.size = group, name, size

    def __iter__(self) -> Iterator[int]:
        while True:
            unit = self.group.add(f"{self.name}/next", 1) - 1
            if unit >= self.size:
                return
            yield unit

    def finished(self, amount: int = 1) -> int:
        """Count ``amount`` of work as finished (by this process); returns the run's total so far."""
        return self.group.add(f"{self.name}/done", amount)

    def done(self) -> int:
        """The work finished so far by every process."""
        return self.group.add(f"{self.name}/done", 0)

    def wait(self, total: int, progress: Callable[[int], None]) -> None:
        """Until ``total`` work is finished by the run, ``progress(done)`` now and then (rank 0,
        its own part done, draws the others' last units)."""
        while (done := self.done()) < total:
            progress(done)
            time.sleep(POLL)
        progress(total)


def join() -> Group:
    """The group of processes this process belongs to: the ``torchrun`` group (joined on the first
    call), else a group of one. A run started by ``torchrun`` with one process is a plain run."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Group()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dist = torch.distributed
    if not dist.is_available():
        raise CamlensError("this PyTorch build has no torch.distributed: run camlens without torchrun")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as error:
            raise CamlensError(f"cannot join the torchrun group (rank {rank} of {world}): {first_line(error)}") from None
        atexit.register(_leave)
    try:  # the group's key-value store, which torchrun's rendezvous made
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError) as error:
        raise CamlensError(f"cannot reach the torchrun group's store (rank {rank} of {world}): {first_line(error)}") from None
    group = Group(rank=rank, world=world, local_rank=local_rank, store=store)
    # Keys of this run only: a store outlives a run where torchrun restarts its workers.
    group.prefix = "camlens/" + group.from_main(lambda: uuid.uuid4().hex)
    return group


def _leave() -> None:
    """Leave the group before the interpreter tears down (PyTorch asks for it: a group left to the
    interpreter's exit may abort the process)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CamlensError(f"{name}={value!r} is not a whole number (torchrun sets it)") from None
