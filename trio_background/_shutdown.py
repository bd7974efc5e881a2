"""Shutdown and its report: the lifecycle phase, draining, the cut-off, what it cut."""

from __future__ import annotations

import enum
import math
from collections import Counter
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import enable_ki_protection

from ._exceptions import BackgroundShutdownError
from ._job import DROPPED

if TYPE_CHECKING:
    from typing import Any

    from ._config import BackgroundJobMetadata
    from ._job import BackgroundJob
    from ._runtime import Runtime

    Job = BackgroundJob[Any]


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
    """The phase, what shutdown waits on, the cut-off and the jobs it cut."""

    __slots__ = ("cancelled", "deadline", "done", "dropped", "idle_lot", "phase", "runtime", "wake")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.phase = Phase.OPEN
        #: Set when the phase becomes CLOSED.
        self.done = trio.Event()
        #: Tasks in wait_idle(), woken at the next instant nothing is queued or running.
        self.idle_lot = trio.lowlevel.ParkingLot()
        #: (acceptance number, metadata) of the jobs the cut-off cancelled / dropped.
        self.cancelled: list[tuple[int, BackgroundJobMetadata]] = []
        self.dropped: list[tuple[int, BackgroundJobMetadata]] = []
        #: When the drain's deadline passes (trio time), once draining.
        self.deadline = math.inf
        #: Set to wake aclose() when it may be done: idle, or only late timers left.
        self.wake: trio.Event | None = None

    def became_idle(self) -> None:
        """Nothing is queued or running: wake wait_idle(), and end a closed runtime."""
        if len(self.idle_lot):
            self.idle_lot.unpark_all()
        if self.phase is Phase.DRAINING or self.phase is Phase.CUT_OFF:
            self.phase = Phase.CLOSED
            self.done.set()
            if self.wake is not None:  # aclose() waits on this, not on done
                self.wake.set()
        self.nudge()

    def nudge(self) -> None:
        """Nothing is queued or running: wake aclose() to see whether only late timers remain."""
        if self.wake is not None and self.phase is Phase.DRAINING:
            self.wake.set()

    def only_late_jobs(self) -> bool:
        """Whether all that is left are scheduled jobs due after the drain's deadline."""
        admission = self.runtime.admission
        return (
            not admission.queued
            and not admission.limiter.borrowed_tokens
            and admission.scheduled > 0
            and admission.next_due() > self.deadline
        )

    async def wait_idle(self) -> None:
        if self.runtime.admission.is_idle():
            await trio.lowlevel.checkpoint()
        else:
            # Woken at the first idle instant; no re-check, which new work could defeat.
            await self.idle_lot.park()

    # -- closing and cutting off --------------------------------------------------------

    @enable_ki_protection
    def close_intake(self) -> None:
        """Refuse new jobs from now on and wake every waiting send() with an error."""
        if self.phase is not Phase.OPEN:
            return
        self.phase = Phase.DRAINING
        admission = self.runtime.admission
        admission.refuse_waiters()
        if admission.is_idle():
            self.became_idle()

    @enable_ki_protection
    def cut_off(self) -> None:
        """Cancel every running job and drop every queued one, at once."""
        for job in self.cut_off_state():
            self.runtime.report_dropped(job)

    def cut_off_state(self) -> list[Job]:
        """The bookkeeping of `cut_off`; returns the dropped jobs, not yet reported."""
        if self.phase is Phase.CUT_OFF or self.phase is Phase.CLOSED:
            return []
        self.close_intake()
        runtime = self.runtime
        admission = runtime.admission
        if admission.is_idle():  # close_intake() ended it: nothing to cut
            return []
        self.phase = Phase.CUT_OFF
        dropped: list[Job] = []
        for job in admission.drop_all():
            self.count_dropped(job)
            dropped.append(job)
        # Jobs holding a slot: running ones are cancelled; one whose task has not run
        # yet finds the cut-off on its first step and counts itself dropped. The lanes'
        # host tasks end with the cut-off: no free lane is used again.
        assert runtime.jobs_nursery is not None
        runtime.jobs_nursery.cancel_scope.cancel()
        admission.free_lanes.clear()
        if admission.is_idle():
            self.became_idle()
        return dropped

    def count_dropped(self, job: Job) -> None:
        self.runtime.dropped += 1
        job._end(DROPPED)
        self.dropped.append((job._accepted_seq(), job._meta()))

    @enable_ki_protection
    def drop_unstarted(self, job: Job) -> None:
        """Count a job that was given a slot but whose code never ran as dropped."""
        self.count_dropped(job)
        sched = job._sched
        if sched is not None:
            if sched.key is not None:
                self.runtime.admission.leave_key(job)
            sched.job = None
        self.runtime.admission.release(job)
        self.runtime.report_dropped(job)

    async def cut_off_and_wait(self) -> None:
        """Cut off, then wait for the cancelled jobs to unwind, so that nothing runs after."""
        self.cut_off()
        with trio.CancelScope(shield=True):
            await self.done.wait()

    @enable_ki_protection
    async def aclose(self, drain_timeout: float) -> None:
        # Only the first call drains against the deadline; later ones wait for it.
        first = self.phase is Phase.OPEN
        if first:
            self.deadline = trio.current_time() + drain_timeout
        self.close_intake()
        try:
            with trio.move_on_after(drain_timeout if first else math.inf):
                if not first:
                    await self.done.wait()
                while not self.done.is_set():
                    if self.only_late_jobs():
                        break  # nothing left runs before the deadline: cut off now
                    self.wake = trio.Event()
                    await self.wake.wait()
        except BaseException:
            await self.cut_off_and_wait()
            raise
        if self.done.is_set():
            return
        # The deadline passed. If something else already cut off (the body raised, a job
        # raised KeyboardInterrupt), that path reports; otherwise this call does.
        by_us = self.phase is Phase.DRAINING
        await self.cut_off_and_wait()
        if by_us:
            error = self.report(drain_timeout)
            if error is not None:
                raise error

    # -- the report -----------------------------------------------------------------------

    def report(self, drain_timeout: float) -> BackgroundShutdownError | None:
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
        if trio.current_time() < self.deadline:
            head = (
                f"drain cut short: only jobs due after its {drain_timeout:g}-second "
                f"deadline were left: "
            )
        else:
            head = f"drain timed out after {drain_timeout:g} seconds: "
        return BackgroundShutdownError(
            head + "; ".join(parts),
            cancelled=cancelled,
            dropped=dropped,
            statistics=self.runtime.statistics(),
        )


def _seq(item: tuple[int, object]) -> int:
    return item[0]


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count} jobs"


def _names(jobs: tuple[BackgroundJobMetadata, ...]) -> str:
    """``send_email x3, reindex`` for the jobs' names, in order of first appearance."""
    counts = Counter(job.name for job in jobs)
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())
