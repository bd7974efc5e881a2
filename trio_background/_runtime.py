"""The runtime: a bounded queue in front of a fixed number of job slots.

How it works, and why
=====================

Three homes share the work: `Admission` (``_admission.py``) accepts jobs and hands
slots on; `Shutdown` (``_shutdown.py``) owns the lifecycle phase, the cut-off and its
report; `Runtime` (here) runs each job in its task and reports on jobs in log records
and instrument hooks. The job record, and how a run's ending is classified, live in
``_job.py``.

Every job is a record (`Job`) that moves through ``queued -> running -> <outcome>``
(or ``queued -> dropped``). Three things must hold at every instant, even inside an
instrument hook, a log handler, or under Ctrl-C:

1. **Every counter moves with the state it describes.** A job changes state, and its
   counters change with it, in one stretch of synchronous, KI-protected code with no
   user code in it (no hook, no log call, no job code). User code runs only after the
   bookkeeping is complete, so a hook that reads `BackgroundRuntime.statistics` sees
   numbers that add up, and a hook or log handler that raises cannot leave a slot
   taken or a job stranded: its error is dealt with after the fact (an instrument is
   removed; a KeyboardInterrupt shuts the runtime down, as one raised by a job does).

2. **A freed slot is handed on at once.** A slot is a `trio.CapacityLimiter` token,
   borrowed on behalf of a slot object. When a job ends, the same synchronous step that
   counts its outcome takes the next job out of the memory channel (the queue), gives
   it the slot object (the token is not released and borrowed again) and starts a Trio
   task for it; a ``send()`` waiting for room is accepted into the place the queue just
   gained. Nothing else can run in between, so a job never waits while a slot is free,
   and jobs take slots in acceptance order. A slot is released only when no job is
   queued.

3. **A job is a Trio task of its own.** Each job runs in a new task started in a copy
   of the context its submitter had when it called ``spawn``/``send``. Its log records
   and its hooks run in that context too: in the job's own task once it runs, in a copy
   of the captured context before that. No contextvar, cancel scope or other per-task
   state of one job can reach another. (Handing a finished job's *task* to the next
   job saves the cost of a task start, but that cannot be made invisible to Trio code:
   a held `trio.Lock`, `trio.lowlevel.current_task`, a leaked cancel scope.)

A job that holds a slot but whose task has not run yet is ``running`` without having
begun. If the runtime is cut off in that window, the job's code never runs: its task
finds the cut-off on its first step and counts the job ``dropped``.

Cancellation: the jobs' nursery lives in a task of its own under a shielded cancel
scope, so nothing but the runtime cancels a job: a cancellation of the ``async with``
from outside reaches the body, which cuts the runtime off. The cut-off cancels the
jobs' nursery; a job's timeout is its own `trio.move_on_after`. So a `trio.Cancelled`
in whatever shape a job's nurseries give it (bare, or inside exception groups, mixed
with errors raised during cleanup) is the runtime's own exactly when the runtime was
cut off or the job's timeout expired; any other `trio.Cancelled` is the job's own
failure.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, final

import trio
from trio.lowlevel import enable_ki_protection

from ._admission import Admission, HandOff
from ._config import BackgroundTaskConfig, Retry, check_int
from ._instrument import Instruments, Outcome
from ._job import (
    _CURRENT,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    SCHEDULED,
    STARTING,
    TIMED_OUT,
    BackgroundJob,
    call_job,
    make_job,
    outcome_of,
    raise_unchanged,
    split_cancelled,
    without_runtime_frames,
)
from ._log import emit_job
from ._shutdown import Phase, Shutdown
from ._statistics import BackgroundStatistics

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    from typing_extensions import TypeVarTuple, Unpack

    from ._config import BackgroundJobMetadata

    PosArgsT = TypeVarTuple("PosArgsT")
    Job = BackgroundJob[Any]

T = TypeVar("T")


class Runtime:
    """What a runtime and its handles share: admission, shutdown, and the outcomes.

    This class runs each job (`run`, the body of the job's task) and reports on jobs
    (log records, instrument hooks); `Admission` accepts jobs and hands slots on, and
    `Shutdown` owns the lifecycle, the cut-off and its report.
    """

    __slots__ = (
        "admission",
        "cancelled",
        "completed",
        "config",
        "dropped",
        "failed",
        "fatal",
        "instruments",
        "jobs_nursery",
        "outer_scope",
        "reserved",
        "retried",
        "shutdown",
        "thread",
        "timed_out",
    )

    def __init__(self, config: BackgroundTaskConfig, instruments: Instruments) -> None:
        self.config = config
        self.instruments = instruments
        instruments.on_interrupt = self.interrupted
        self.admission = Admission(self, config.max_queue_size, config.max_concurrent_tasks)
        self.shutdown = Shutdown(self)
        #: How jobs ended (``dropped``: never ran).
        self.completed = 0
        self.failed = 0
        self.timed_out = 0
        self.cancelled = 0
        self.dropped = 0
        #: Retries: runs that failed and were scheduled to run again.
        self.retried = 0
        #: Room (queue places and slots) that durable queues reserved for claims under way.
        self.reserved = 0
        #: The thread that entered the block; set on entry.
        self.thread: int | None = None
        self.jobs_nursery: trio.Nursery | None = None
        #: The cancel scope of the block's own nursery: cancelling it interrupts the body.
        self.outer_scope: trio.CancelScope | None = None
        #: KeyboardInterrupt/SystemExit raised by jobs or hooks, to re-raise from the block.
        self.fatal: list[BaseException] = []

    # -- running one job ------------------------------------------------------------------

    @enable_ki_protection
    async def run(self, job: Job) -> None:
        """The body of a job's task: run it (unless cut off first), then account for it."""
        state = job._state
        if state is not STARTING and state is not CANCELLING:
            return  # its start was undone (see Admission.try_accept)
        shutdown = self.shutdown
        if shutdown.phase is Phase.CUT_OFF and state is STARTING:
            shutdown.drop_unstarted(job)
            return
        # (A job cancelled through its handle before the cut-off ends cancelled, below.)
        _CURRENT.set(job)
        hooks = self.instruments.hooks
        if hooks:
            job._started_at = trio.current_time()
            if "job_started" in hooks:
                self.instruments.call("job_started", job._meta())
                if self.cut_off_begun():
                    # A hook interrupted the runtime: the job's code never runs. The
                    # instruments saw it start, so it ends as a cancelled job, at once.
                    self.finish(job, None, False, ran=False)
                    return
        if job._state is CANCELLING:  # cancelled through its handle before its code ran
            self.finish(job, None, False, ran=False)
            return
        job._state = RUNNING
        error: BaseException | None = None
        timed_out = False
        value = None
        try:
            if job._timeout is None:
                value = await call_job(job._fn, job._args, job)
            else:
                with trio.move_on_after(job._timeout) as scope:
                    try:
                        value = await call_job(job._fn, job._args, job)
                    finally:
                        # Past its deadline, even if it shielded itself or swallowed Cancelled.
                        timed_out = scope.cancel_called
        except BaseException as exc:
            error = exc
        if error is None and not timed_out and not self.cut_off_begun():
            # Returned normally (even if cancel() came too late to stop it).
            self.completed += 1
            job._fn = None
            job._args = ()
            job._context = None
            done = job._value  # what job._end() does, inline on this path
            job._state = COMPLETED
            job._value = value
            if done is not None:
                done.set()
            events = self.admission.hand_off(job)
            if events is not None or self.instruments.hooks:
                self.report_finished(job, "completed", events)
            return
        del value
        try:
            self.finish(job, error, timed_out)
        finally:
            del error  # no cycle through this frame's traceback

    def cut_off_begun(self) -> bool:
        return self.shutdown.phase is Phase.CUT_OFF

    @enable_ki_protection
    def finish(
        self, job: Job, error: BaseException | None, timed_out: bool, *, ran: bool = True
    ) -> None:
        """Count how ``job`` ended, hand its slot on, then log and report it.

        ``ran=False``: the job's code never ran (cut off or cancelled after its start
        was reported): it counts cancelled.
        """
        shutdown = self.shutdown
        cut_off = self.cut_off_begun()
        by_handle = job._state is CANCELLING
        if ran:
            outcome, fatal, cleanup = outcome_of(error, timed_out, cut_off, by_handle)
        else:
            outcome, fatal, cleanup = CANCELLED, None, None
        if fatal is not None:  # cut off first: no queued job may take this slot
            self.note_fatal(fatal)
            dropped = shutdown.cut_off_state()
        else:
            dropped = []
            if outcome in (FAILED, TIMED_OUT) and job._sched is not None:
                retry = job._sched.retry
                if retry is not None and job._sched.attempt < retry.attempts:
                    reason = trio.TooSlowError() if outcome == TIMED_OUT else error
                    if isinstance(reason, retry.on):
                        assert reason is not None
                        reason.__traceback__ = without_runtime_frames(reason.__traceback__)
                        self.retry(job, retry.delay(job._sched.attempt, random.random), reason)
                        return
        failure: BaseException | None = None
        if outcome == FAILED:
            self.failed += 1
            assert error is not None
            failure = fatal if fatal is not None else error
            failure.__traceback__ = without_runtime_frames(failure.__traceback__)
        elif outcome == CANCELLED:
            self.cancelled += 1
            if cut_off and not by_handle:
                shutdown.cancelled.append((job._accepted_seq(), job._meta()))
        elif outcome == TIMED_OUT:
            self.timed_out += 1
        else:
            self.completed += 1
        job._end(outcome, None if failure is None else (failure, failure.__traceback__))
        events = self.admission.hand_off(job)
        # -- the state is complete; now the user code: log handlers, hooks ----------
        # First the jobs the hand-off accepted: a log handler or hook that interrupts the
        # runtime would drop them, and no instrument may see a job dropped before accepted.
        self.report_admitted(events)
        meta = job._meta()
        job._release()
        sched = job._sched
        again = ""
        if sched is not None and sched.retry_elsewhere is not None:
            delay, attempts = sched.retry_elsewhere
            again = _retrying(sched.attempt, attempts, delay)
        if outcome == FAILED and fatal is None:
            assert failure is not None
            if again:
                self.log_warning(meta, "failed" + again, failure)
            else:
                self.log_error(meta, "failed", failure)
        elif outcome == TIMED_OUT:
            self.log_warning(meta, f"timed out after {job._timeout:g} seconds{again}")
        elif outcome == CANCELLED and not by_handle:
            self.log_warning(meta, "cancelled at shutdown")
        if cleanup is not None:
            self.log_error(meta, "raised an error while being cancelled", cleanup)
        self.report_finished(job, outcome, events, failure)  # type: ignore[arg-type]
        for other in dropped:
            self.report_dropped(other)

    def retry(self, job: Job, delay: float, reason: BaseException) -> None:
        """The run of ``job`` failed with ``reason``: it runs again in ``delay`` seconds."""
        sched = job._sched
        assert sched is not None
        assert sched.retry is not None
        self.retried += 1
        run = sched.attempt
        self.admission.retry_later(job, delay)
        events = self.admission.hand_off(job)
        # -- the state is complete; now the user code: log handlers, hooks ----------
        if events is not None:
            self.report_accepted(events)
        meta = job._meta()
        # The hook before the log: a log handler that interrupts the runtime drops the
        # job, and instruments must see this run end (retrying) before the job dropped;
        # and before the jobs found due, which may be this one (a retry without delay).
        if "job_retrying" in self.instruments.hooks:
            self.instruments.call("job_retrying", meta, reason, delay)
        if events is not None:
            self.report_due(events)
        what = (
            f"timed out after {job._timeout:g} seconds"
            if isinstance(reason, trio.TooSlowError)
            else "failed"
        )
        self.log_warning(
            meta,
            what + _retrying(run, sched.retry.attempts, delay),
            None if isinstance(reason, trio.TooSlowError) else reason,
        )
        self.report_events(events)

    @enable_ki_protection
    def start_failed(self, job: Job, exc: BaseException) -> None:
        """Count ``job``, which holds a slot but whose task could not be started, failed."""
        self.failed += 1
        job._end(FAILED, (exc, None))  # (its traceback: see report_start_failure)
        events = self.admission.hand_off(job)
        self.report_start_failure(job, exc)
        self.report_events(events)

    # -- what handles and the runtime ask for -------------------------------------------

    @enable_ki_protection
    def cancel_job(self, job: Job) -> None:
        self.check_thread("cancel", "run_sync(job.cancel)")
        state = job._state
        if state is QUEUED or state is SCHEDULED:
            events = self.admission.withdraw(job)
            self.report_admitted(events)  # (first: see finish)
            if "job_dropped" in self.instruments.hooks:
                self.call_hook(job, "job_dropped")
            job._release()
            self.report_events(events)
        elif self.cut_off_begun():
            return  # the cut-off cancels it (or drops it, if its code has not run yet)
        elif state is STARTING:
            job._state = CANCELLING  # its task finds this first and does not run it
        elif state is RUNNING:
            job._state = CANCELLING
            job._slot.kill()

    @enable_ki_protection
    def resize(self, max_concurrent_tasks: int | None, max_queue_size: int | None) -> None:
        self.report_events(self.admission.resize(max_concurrent_tasks, max_queue_size))

    # -- reporting: log records and hooks, after the bookkeeping ----------------------------

    def call_hook(self, job: Job, hook: str, *args: object) -> None:
        """Call ``hook(job metadata, *args)`` for a job that is not running; never raises."""
        try:
            self.in_context(job, self.instruments.call, hook, job._meta(), *args)
        except BaseException as exc:  # the call itself failed (say, RecursionError)
            with contextlib.suppress(BaseException):  # nothing is left to report with
                self.log_error(job._meta(), f"could not be reported to {hook}", exc)

    def in_context(self, job: Job, fn: Callable[..., object], *args: object) -> None:
        """Call ``fn`` for a job that is not running, in a copy of the job's context."""
        context = job._context
        if context is None:
            fn(*args)
        else:
            context.copy().run(fn, *args)

    def log_error(self, meta: BackgroundJobMetadata, what: str, exc: BaseException) -> None:
        emit_job(self.interrupted, logging.ERROR, meta, what, exc_info=exc)

    def log_warning(
        self, meta: BackgroundJobMetadata, what: str, exc: BaseException | None = None
    ) -> None:
        emit_job(self.interrupted, logging.WARNING, meta, what, exc_info=exc)

    def report_finished(
        self,
        job: Job,
        outcome: Outcome,
        events: HandOff | None,
        failure: BaseException | None = None,
    ) -> None:
        """Call the hooks for a job that ended and for what its hand-off did."""
        instruments = self.instruments
        hooks = instruments.hooks
        self.report_admitted(events)
        if failure is not None and "job_failed" in hooks:
            instruments.call("job_failed", job._meta(), failure)
        if "job_finished" in hooks:
            duration = trio.current_time() - job._started_at
            instruments.call("job_finished", job._meta(), outcome, duration)
        self.report_events(events)  # (what is left of them: the failed starts)

    def report_admitted(self, events: HandOff | None) -> None:
        """Report what a hand-off did besides failed starts: jobs due, senders accepted.

        ``job_accepted`` (and ``job_scheduled``, for a job with a delay) for the jobs
        of waiting send()s it accepted, then ``job_due`` for the scheduled jobs it
        found due. The counters already include them. Each is reported once: the
        lists are emptied.
        """
        if events is None:
            return
        self.report_accepted(events)
        self.report_due(events)

    def report_accepted(self, events: HandOff) -> None:
        if not events.admitted:
            return
        admitted, events.admitted = events.admitted, []
        hooks = self.instruments.hooks
        accepted = "job_accepted" in hooks
        scheduled = "job_scheduled" in hooks
        if accepted or scheduled:
            for other in admitted:
                if accepted:
                    self.call_hook(other, "job_accepted")
                if scheduled and other._state is SCHEDULED:  # (not if a hook dropped it)
                    self.call_hook(other, "job_scheduled", other._sched.delay)  # type: ignore[union-attr]

    def report_due(self, events: HandOff) -> None:
        if not events.due:
            return
        due, events.due = events.due, []
        for other in due:
            self.report_due_of(other)

    def report_due_of(self, job: Job) -> None:
        """``job_due`` for ``job``, unless reported already or the job left meanwhile.

        A hook (of this report) that re-entered the runtime may have dropped the job
        (instruments saw that: no due then), or started it: a start that failed is
        reported at once, and reports the job due first. (A start that succeeds is
        reported later, by the job's own task.)
        """
        sched = job._sched
        if sched is not None and sched.unreported_due:
            sched.unreported_due = False
            if job._state not in FINAL or job._state is FAILED:
                self.call_hook(job, "job_due")

    def report_events(self, events: HandOff | None) -> None:
        """Report what a hand-off did: the senders it accepted, then the failed starts."""
        if events is None:
            return
        self.report_admitted(events)
        for other, exc in events.failed_to_start:
            self.report_start_failure(other, exc)

    def report_start_failure(self, job: Job, exc: BaseException) -> None:
        self.report_due_of(job)
        meta = job._meta()
        self.in_context(job, self.log_error, meta, "failed: its task could not be started", exc)
        # Its traceback is the runtime's and Trio's frames, which hold this job and the one
        # that handed it its slot: once logged, the job keeps the exception without it.
        exc.__traceback__ = None
        instruments = self.instruments
        if "job_started" in instruments.hooks:
            self.in_context(job, instruments.call, "job_started", meta)
        if "job_failed" in instruments.hooks:
            self.in_context(job, instruments.call, "job_failed", meta, exc)
        if "job_finished" in instruments.hooks:
            self.in_context(job, instruments.call, "job_finished", meta, "failed", 0.0)
        job._release()
        if not isinstance(exc, Exception):
            self.interrupted(exc)

    def report_dropped(self, job: Job) -> None:
        meta = job._meta()
        sched = job._sched
        if sched is not None and sched.retried and sched.retry is not None:
            what = (
                f"dropped at shutdown while waiting to retry "
                f"(attempt {sched.attempt} of {sched.retry.attempts})"
            )
        else:
            what = "dropped at shutdown without starting"
        self.in_context(job, self.log_warning, meta, what)
        if "job_dropped" in self.instruments.hooks:
            self.call_hook(job, "job_dropped")
        job._release()

    # -- what must leave the block ------------------------------------------------------------

    @enable_ki_protection
    def interrupted(self, exc: BaseException) -> None:
        """A job or a hook raised KeyboardInterrupt (or SystemExit): shut everything down.

        The exception leaves the ``async with`` block once every job has unwound.
        """
        self.note_fatal(exc)
        self.shutdown.cut_off()

    def note_fatal(self, exc: BaseException) -> None:
        if not any(exc is seen for seen in self.fatal):
            self.fatal.append(exc)
        if self.outer_scope is not None:
            self.outer_scope.cancel()

    def check_thread(self, method: str, advice: str) -> None:
        """Raise unless called from the runtime's thread; ``advice``: the from_thread call."""
        if threading.get_ident() != self.thread:
            raise RuntimeError(
                f"{method}() must be called from the runtime's Trio thread; from another "
                f"thread use trio.from_thread.{advice}"
            )

    def check_not_in_job(self, method: str) -> None:
        self.check_thread(method, f"run(runtime.{method})")
        nursery = self.jobs_nursery
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            parent = task.parent_nursery
            if parent is None:
                return
            if parent is nursery:
                raise RuntimeError(
                    f"{method}() called from inside one of this runtime's own jobs "
                    "would wait for itself"
                )
            task = parent.parent_task

    def statistics(self) -> BackgroundStatistics:
        admission = self.admission
        return BackgroundStatistics(
            scheduled=admission.scheduled,
            queued=admission.queued,
            running=admission.limiter.borrowed_tokens,
            completed=self.completed,
            failed=self.failed,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            dropped=self.dropped,
            rejected=admission.rejected,
            max_queue_size=admission.max_queue_size,
            max_concurrent_tasks=admission.max_concurrent_tasks,
            closed=self.shutdown.phase is not Phase.OPEN,
            accepted=admission.accepted,
            retried=self.retried,
        )

    async def host_jobs(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the nursery the jobs run in, shielded: only the runtime cancels jobs."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                self.jobs_nursery = nursery
                self.admission.open(nursery)
                task_status.started()
                await trio.sleep_forever()


@final
class BackgroundHandle:
    """Submits jobs to a runtime. Get one from `BackgroundRuntime.handle`.

    Handles are cheap: make as many as you like; they all feed the same queue.
    Both methods must be called from the runtime's Trio thread (from another
    thread, use ``trio.from_thread.run_sync(handle.spawn, ...)``).
    """

    __slots__ = ("_runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def spawn(
        self,
        async_fn: Callable[[Unpack[PosArgsT]], Awaitable[T]],
        *args: Unpack[PosArgsT],
        name: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        retry: Retry | None = None,
        key: str | None = None,
    ) -> BackgroundJob[T]:
        """Submit ``async_fn(*args)`` as a job, without waiting.

        If a slot is free and nothing is queued, the job takes the slot at once
        (it counts as running); otherwise it joins the queue. The coroutine is
        created only when the job starts, in its own task, in a copy of the
        caller's `contextvars` context. If this raises, nothing was accepted.
        Ignoring the returned job is fine.

        Args:
            async_fn: The async function to run. Pass the function, not a coroutine.
            *args: Positional arguments for ``async_fn``.
            name: The job's name in logs, instruments and reports (default:
                ``async_fn.__qualname__``).
            request_id: An id tying the job to a request, for logs and reports.
            timeout: Seconds the job may run before it is cancelled and counted
                as ``timed_out``; overrides `BackgroundTaskConfig.job_timeout`.
            delay: Seconds to wait before the job becomes ready to start (it
                counts ``scheduled`` until then, holding a queue place but no
                slot); `None` or 0 for none.
            retry: How to retry the job when a run fails; overrides
                `BackgroundTaskConfig.retry`.
            key: Jobs with the same key never run at the same time, and start
                in the order they became ready.

        Returns:
            The job, to follow, wait for or cancel.

        Raises:
            QueueFullError: Every slot is busy and the queue is full (counted in
                `BackgroundStatistics.rejected`).
            RuntimeClosedError: Shutdown has begun.
            TypeError: ``async_fn`` is not an async function (a coroutine object,
                a builtin such as `time.sleep`, a class, or not callable), or
                ``name``, ``request_id`` or ``timeout`` has the wrong type.
            ValueError: ``timeout`` is not > 0, is NaN, or is too large.
            RuntimeError: Called from a thread other than the runtime's.
        """
        runtime = self._runtime
        job = make_job(
            runtime, "spawn", async_fn, args, name, request_id, timeout, delay, retry, key
        )
        runtime.admission.spawn(job)
        return job

    async def send(
        self,
        async_fn: Callable[[Unpack[PosArgsT]], Awaitable[T]],
        *args: Unpack[PosArgsT],
        name: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-job limit, not for this call)
        delay: float | None = None,
        retry: Retry | None = None,
        key: str | None = None,
    ) -> BackgroundJob[T]:
        """Submit ``async_fn(*args)`` as a job, waiting while the queue is full.

        Takes the same arguments as `spawn`. This is a checkpoint. Tasks waiting
        here are accepted in the order they arrived, as soon as there is room.
        If the calling task is cancelled while it waits, its job was not accepted.

        Returns:
            The job, to follow, wait for or cancel.

        Raises:
            RuntimeClosedError: Shutdown began before or while waiting.
            TypeError: As for `spawn`.
            ValueError: As for `spawn`.
            RuntimeError: Called from a thread other than the runtime's.
        """
        runtime = self._runtime
        job = make_job(
            runtime, "send", async_fn, args, name, request_id, timeout, delay, retry, key
        )
        await runtime.admission.send(job)
        return job

    def __repr__(self) -> str:
        return f"<trio_background.BackgroundHandle at {id(self):#x}>"


@final
class BackgroundRuntime:
    """A running set of background jobs. Created by `open_background_runtime`."""

    __slots__ = ("_runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def handle(self) -> BackgroundHandle:
        """Return a new handle that submits jobs to this runtime."""
        return BackgroundHandle(self._runtime)

    def statistics(self) -> BackgroundStatistics:
        """Return a snapshot of the queue, the slots and the job counters."""
        return self._runtime.statistics()

    def resize(
        self, *, max_concurrent_tasks: int | None = None, max_queue_size: int | None = None
    ) -> None:
        """Change the number of slots and the size of the queue, live.

        Growing the slots starts queued jobs at once, in order; growing the queue
        accepts waiting `BackgroundHandle.send` calls at once. Shrinking never
        cancels or drops a job: running jobs finish and queued jobs stay queued,
        no job starts while `BackgroundStatistics.running` is at or above the new
        number of slots, and new jobs are refused while the queue holds as many
        jobs as the new size or more. `statistics` shows the new limits at once.

        Args:
            max_concurrent_tasks: The new number of slots (``>= 1``), or `None`
                to keep it.
            max_queue_size: The new queue size (``>= 0``), or `None` to keep it.

        Raises:
            TypeError: A value is not an int (`bool` is refused too).
            ValueError: A value is out of range. Nothing changes on any error.
            RuntimeError: Called from a thread other than the runtime's.
        """
        runtime = self._runtime
        runtime.check_thread(
            "resize", "run_sync(functools.partial(runtime.resize, max_concurrent_tasks=...))"
        )
        if max_concurrent_tasks is not None:
            check_int("max_concurrent_tasks", max_concurrent_tasks, 1)
        if max_queue_size is not None:
            check_int("max_queue_size", max_queue_size, 0)
        runtime.resize(max_concurrent_tasks, max_queue_size)

    async def wait_idle(self) -> None:
        """Wait for the first moment, from now on, at which no job is queued or running.

        Returns after a checkpoint if the runtime is idle already. It returns even if
        new jobs were submitted between that moment and the moment it resumes.

        Raises:
            RuntimeError: Called from inside one of this runtime's own jobs.
        """
        self._runtime.check_not_in_job("wait_idle")
        await self._runtime.shutdown.wait_idle()

    async def aclose(self) -> None:
        """Stop accepting jobs, drain, and cut off whatever is left at the deadline.

        Intake closes at once: later and waiting `BackgroundHandle.spawn` and
        `BackgroundHandle.send` calls raise `RuntimeClosedError`. Queued jobs
        keep starting and running jobs keep running for up to
        `BackgroundTaskConfig.drain_timeout` seconds; then running jobs are
        cancelled and queued ones dropped. Returns as soon as the work is done.
        Calling it again returns `None` once the first call has finished. If
        the calling task is cancelled, everything is cut off at once and the
        cancellation propagates.

        Raises:
            BackgroundShutdownError: Jobs were cut off; the error lists them.
            RuntimeError: Called from inside one of this runtime's own jobs
                (it would wait for itself); the runtime stays open.
        """
        runtime = self._runtime
        runtime.check_not_in_job("aclose")
        await runtime.shutdown.aclose(runtime.config.drain_timeout)

    def __getattr__(self, name: str) -> NoReturn:
        if name in ("spawn", "send"):
            raise AttributeError(
                f"'BackgroundRuntime' object has no attribute {name!r}: jobs are submitted "
                f"through a handle, e.g. runtime.handle().{name}(fn, *args)"
            )
        raise AttributeError(f"'BackgroundRuntime' object has no attribute {name!r}")

    def __repr__(self) -> str:
        runtime = self._runtime
        admission = runtime.admission
        return (
            f"<trio_background.BackgroundRuntime at {id(self):#x}, "
            f"{runtime.shutdown.phase.value}, "
            f"{admission.limiter.borrowed_tokens}/{admission.max_concurrent_tasks} running, "
            f"{admission.queued}/{admission.max_queue_size} queued>"
        )


_USE_ASYNC_WITH = "write `async with open_background_runtime(...) as runtime:`"


@final
class BackgroundRuntimeManager:
    """What `open_background_runtime` returns: enter it with ``async with``."""

    __module__ = "trio_background"  # as reprs and tracebacks show it: no private module
    __slots__ = ("_cm", "_runtime")

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._cm: AbstractAsyncContextManager[BackgroundRuntime] | None = None

    async def __aenter__(self) -> BackgroundRuntime:
        if self._cm is not None:
            raise RuntimeError("this open_background_runtime() was already entered once")
        self._cm = cm = _open(self._runtime)
        return await cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(exc_type, exc, tb)

    def __enter__(self) -> NoReturn:
        raise TypeError(
            f"open_background_runtime() is an async context manager: {_USE_ASYNC_WITH} "
            f"instead of `with`"
        )

    def __exit__(self, *args: object) -> None:  # pragma: no cover (never entered)
        pass

    def __await__(self) -> NoReturn:
        raise TypeError(f"open_background_runtime() is not awaitable: {_USE_ASYNC_WITH}")

    def __getattr__(self, name: str) -> NoReturn:
        raise AttributeError(
            f"open_background_runtime() returns an async context manager, not the runtime, "
            f"so it has no attribute {name!r}: {_USE_ASYNC_WITH} and use `runtime` inside "
            f"the block"
        )

    def __repr__(self) -> str:
        return f"<trio_background.open_background_runtime() at {id(self):#x}>"


def open_background_runtime(
    config: BackgroundTaskConfig | None = None,
    *,
    instruments: Iterable[object] = (),
) -> AbstractAsyncContextManager[BackgroundRuntime]:
    """Open a runtime that runs background jobs until the block ends.

    Use it as ``async with open_background_runtime(config) as runtime:``. The
    runtime owns a nursery: no job outlives the block. It belongs to the Trio
    thread that enters the block. When the block ends normally the runtime
    calls `BackgroundRuntime.aclose`, which drains (and may raise
    `BackgroundShutdownError`). If the body raises or is cancelled, the runtime
    does not drain: it cancels running jobs, drops queued ones, logs them, and
    the body's exception propagates unchanged.

    Args:
        config: Limits and timeouts; `BackgroundTaskConfig` defaults if `None`.
        instruments: Objects with the methods of `BackgroundInstrument`.

    Returns:
        An async context manager that yields the `BackgroundRuntime`.

    Raises:
        TypeError: ``config`` is not a `BackgroundTaskConfig` or `None`, or
            ``instruments`` is not iterable.
    """
    if config is None:
        config = BackgroundTaskConfig()
    elif not isinstance(config, BackgroundTaskConfig):
        raise TypeError(
            f"config must be a BackgroundTaskConfig or None, not {type(config).__name__}"
        )
    if isinstance(instruments, (str, bytes)):
        raise TypeError("instruments must be an iterable of instruments, not a string")
    try:
        hooks = Instruments(instruments)
    except TypeError:
        raise TypeError(
            f"instruments must be an iterable of instruments, not {type(instruments).__name__}"
        ) from None
    return BackgroundRuntimeManager(Runtime(config, hooks))


@asynccontextmanager
@enable_ki_protection
async def _open(runtime: Runtime) -> AsyncIterator[BackgroundRuntime]:
    runtime.thread = threading.get_ident()
    pending: BaseException | None = None
    async with trio.open_nursery() as outer:
        runtime.outer_scope = outer.cancel_scope
        await outer.start(runtime.host_jobs)
        jobs_nursery = runtime.jobs_nursery
        assert jobs_nursery is not None
        try:
            yield BackgroundRuntime(runtime)
        except BaseException as exc:
            runtime.shutdown.cut_off()
            pending = exc
        else:
            try:
                await runtime.shutdown.aclose(runtime.config.drain_timeout)
            except BaseException as exc:
                pending = exc
        finally:
            jobs_nursery.cancel_scope.cancel()
    # A closed runtime keeps nothing of its run: no lane, no nursery (which would keep the
    # whole Trio run, and what its tasks raised, alive), no exception.
    runtime.admission.free_lanes.clear()
    runtime.admission.nursery = runtime.jobs_nursery = runtime.outer_scope = None
    fatal, runtime.fatal = runtime.fatal, []
    try:
        _leave(pending, fatal)
    finally:
        del pending


def _retrying(attempt: int, attempts: int, delay: float) -> str:
    """What a log record about a failed run adds when the job runs again."""
    return f" on attempt {attempt} of {attempts}; retrying in {delay:.3g} seconds"


def _leave(pending: BaseException | None, fatal: list[BaseException]) -> None:
    """Raise what must leave the block: the body's error and/or what jobs or hooks raised.

    Each exception leaves as the same object, its ``__cause__`` and ``__context__``
    intact; several leave together as an exception group.
    """
    if not fatal:
        if pending is not None:
            raise_unchanged(pending)
        return
    errors = list(fatal)
    if (
        pending is not None
        and split_cancelled(pending)[1] is not None  # not a cancellation (bare or grouped)
        and not any(pending is seen for seen in fatal)  # e.g. re-raised by job.wait()
    ):
        errors.insert(0, pending)
    if len(errors) == 1:
        raise_unchanged(errors[0])
    raise BaseExceptionGroup("errors in a background runtime", errors)
