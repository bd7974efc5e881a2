"""Shutdown: the runtime's lifecycle phase and the report of what a cut-off cut."""

from __future__ import annotations

import enum
from collections import Counter
from typing import TYPE_CHECKING

import trio

from ._exceptions import BackgroundShutdownError

if TYPE_CHECKING:
    from ._config import BackgroundJobMetadata
    from ._statistics import BackgroundStatistics


class Phase(enum.Enum):
    """Where a runtime is in its life; it only ever moves forward."""

    #: Accepting jobs.
    OPEN = "open"
    #: Intake closed (aclose() began); queued jobs keep starting, running ones finish.
    DRAINING = "draining"
    #: Cut off: running jobs were cancelled, queued ones dropped; no job's code starts.
    CUT_OFF = "cut_off"
    #: Intake closed and nothing queued or running: the end.
    CLOSED = "closed"


class Shutdown:
    """The phase, the events shutdown waits on, and the jobs a cut-off cut."""

    __slots__ = ("cancelled", "done", "dropped", "idle_lot", "phase", "reporter")

    def __init__(self) -> None:
        self.phase = Phase.OPEN
        #: Set when the phase becomes CLOSED.
        self.done = trio.Event()
        #: Tasks in wait_idle(), woken at the next instant nothing is queued or running.
        self.idle_lot = trio.lowlevel.ParkingLot()
        #: (acceptance number, metadata) of jobs the cut-off cancelled / dropped.
        self.cancelled: list[tuple[int, BackgroundJobMetadata]] = []
        self.dropped: list[tuple[int, BackgroundJobMetadata]] = []
        #: Whether the cut-off was made by an aclose() at its drain deadline (that call
        #: raises the report) rather than by an error or a cancellation.
        self.reporter = False

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.OPEN

    def became_idle(self) -> None:
        """Nothing is queued or running: wake wait_idle(), and end a closed runtime."""
        if len(self.idle_lot):
            self.idle_lot.unpark_all()
        if self.phase is Phase.DRAINING or self.phase is Phase.CUT_OFF:
            self.phase = Phase.CLOSED
            self.done.set()

    def report(
        self, drain_timeout: float, statistics: BackgroundStatistics
    ) -> BackgroundShutdownError | None:
        """The error aclose() raises for its cut-off, or None if it cut nothing."""
        if not self.cancelled and not self.dropped:
            return None
        cancelled = tuple(meta for _, meta in sorted(self.cancelled, key=_seq))
        dropped = tuple(meta for _, meta in sorted(self.dropped, key=_seq))
        parts = []
        if cancelled:
            parts.append(f"cancelled {_jobs(len(cancelled))} still running ({_names(cancelled)})")
        if dropped:
            parts.append(f"dropped {_jobs(len(dropped))} never started ({_names(dropped)})")
        return BackgroundShutdownError(
            f"drain timed out after {drain_timeout:g} seconds: " + "; ".join(parts),
            cancelled=cancelled,
            dropped=dropped,
            statistics=statistics,
        )


def _seq(item: tuple[int, object]) -> int:
    return item[0]


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count} jobs"


#: How many distinct job names the message of a shutdown report lists.
_MAX_NAMES = 10


def _names(jobs: tuple[BackgroundJobMetadata, ...]) -> str:
    """``send_email x3, reindex`` for the jobs' names, in order of first appearance."""
    counts = Counter(job.name for job in jobs)
    shown = [name if n == 1 else f"{name} x{n}" for name, n in counts.items()]
    if len(shown) > _MAX_NAMES:
        rest = len(shown) - _MAX_NAMES
        shown = [*shown[:_MAX_NAMES], f"{rest} more name{'s' if rest > 1 else ''}"]
    return ", ".join(shown)
