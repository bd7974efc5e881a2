"""The runtime: a bounded queue in front of a fixed number of job slots."""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Coroutine, Generator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, final

import trio
from trio.lowlevel import enable_ki_protection

from ._config import BackgroundJobMetadata, BackgroundTaskConfig, check_timeout
from ._exceptions import BackgroundShutdownError, QueueFullError, RuntimeClosedError
from ._instrument import Instruments, Outcome
from ._statistics import BackgroundStatistics

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
    from contextlib import AbstractAsyncContextManager

    from typing_extensions import TypeVarTuple, Unpack

    PosArgsT = TypeVarTuple("PosArgsT")

logger = logging.getLogger("trio_background")

_CoroutineType = types.CoroutineType


def _name_of(fn: object) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    return type(fn).__qualname__


def _log_job(level: int, job: _Job, what: str, *, exc_info: bool = False) -> None:
    """Log ``background job '<name>' <what>`` with the job_name/request_id record attributes."""
    meta = job.metadata()
    logger.log(
        level,
        "background job %r %s",
        meta.name,
        what,
        exc_info=exc_info,
        extra={"job_name": meta.name, "request_id": meta.request_id},
    )


class _Job:
    """One accepted (or about to be accepted) job: what to call and how to report it."""

    __slots__ = (
        "_metadata",
        "args",
        "context",
        "fn",
        "name",
        "request_id",
        "seq",
        "started_at",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[..., object],
        args: tuple[object, ...],
        name: str | None,
        request_id: str | None,
        timeout: float | None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.name = name
        self.request_id = request_id
        self.timeout = timeout
        # Set only for jobs that wait (in the queue or in send()): the submitter's context.
        self.context: contextvars.Context | None = None
        # Acceptance order, from 1; 0 means "not accepted (yet)".
        self.seq = 0
        self.started_at = 0.0
        self._metadata: BackgroundJobMetadata | None = None

    def metadata(self) -> BackgroundJobMetadata:
        if self._metadata is None:
            name = self.name if self.name is not None else _name_of(self.fn)
            self._metadata = BackgroundJobMetadata(name, self.request_id)
        return self._metadata


class _RuntimeState:
    """Everything a runtime and its handles share.

    Jobs wait in a bounded trio memory channel and run while holding a token of
    a `trio.CapacityLimiter`. Only the ``*_nowait`` operations of both are used,
    from synchronous code, so every counter moves atomically with the state it
    describes: a job that ends hands its slot (and its task) to the next queued
    job before anything else can run.
    """

    def __init__(self, config: BackgroundTaskConfig, instruments: Instruments) -> None:
        self.config = config
        self.instruments = instruments
        self.thread = threading.get_ident()
        self.max_queue_size = config.max_queue_size
        self.max_concurrent_tasks = config.max_concurrent_tasks
        self.job_timeout = config.job_timeout
        # The queue. Its buffer holds exactly `queued` jobs: nobody ever blocks on it.
        self.send_channel, self.receive_channel = trio.open_memory_channel[_Job](
            config.max_queue_size
        )
        # The slots: one token per running job, borrowed on the job's behalf.
        self.limiter = trio.CapacityLimiter(config.max_concurrent_tasks)
        # Tasks blocked in send(), in arrival order, with the job each wants to submit.
        self.send_waiters: OrderedDict[trio.lowlevel.Task, _Job] = OrderedDict()
        self.idle_lot = trio.lowlevel.ParkingLot()
        self.done = trio.Event()
        self.jobs_nursery: trio.Nursery | None = None
        self.queued = 0
        self.completed = 0
        self.failed = 0
        self.timed_out = 0
        self.cancelled = 0
        self.dropped = 0
        self.rejected = 0
        self.last_seq = 0
        self.closed = False
        self.closing = False
        self.cutting_off = False
        self.cut_cancelled: list[_Job] = []
        self.cut_dropped: list[_Job] = []

    # -- submission ---------------------------------------------------------------

    def make_job(
        self,
        method: str,
        fn: object,
        args: tuple[object, ...],
        name: str | None,
        request_id: str | None,
        timeout: float | None,
    ) -> _Job:
        if threading.get_ident() != self.thread:
            raise RuntimeError(
                f"{method}() must be called from the runtime's Trio thread; from another "
                f"thread use trio.from_thread.run_sync(handle.{method}, ...)"
            )
        if not callable(fn):
            if isinstance(fn, Coroutine):
                raise TypeError(
                    f"{method}() expects an async function, not a coroutine object: pass the "
                    f"function and its arguments separately, e.g. {method}(fn, arg) instead "
                    f"of {method}(fn(arg))"
                )
            raise TypeError(f"{method}() expects an async function, not {type(fn).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, not {type(request_id).__name__}")
        if timeout is None:
            timeout = self.job_timeout
        else:
            check_timeout("timeout", timeout, allow_none=True, allow_zero=False)
        return _Job(fn, args, name, request_id, timeout)

    # Instrument hooks are called only once the state they describe is complete, so a
    # hook that reads statistics() sees counters that add up.

    def try_accept(self, job: _Job) -> bool:
        """Start ``job`` or queue it; False when every slot is busy and the queue is full."""
        if self.closed:
            raise RuntimeClosedError
        if not self.queued and self.limiter.borrowed_tokens < self.max_concurrent_tasks:
            self._accept(job)
            # start_soon copies the current context: the submitter's.
            self._start(job)
            if self.instruments.hooks:
                self._report_accepted(job)
                self._report_started(job)
        elif self.queued < self.max_queue_size:
            job.context = contextvars.copy_context()
            self._accept(job)
            self._enqueue(job)
            if self.instruments.hooks:
                self._report_accepted(job)
        else:
            return False
        return True

    @enable_ki_protection
    def spawn(self, job: _Job) -> None:
        if not self.try_accept(job):
            self.rejected += 1
            if self.instruments.hooks:
                self.instruments.call("job_rejected", job.metadata())
            raise QueueFullError

    @enable_ki_protection
    async def send(self, job: _Job) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.try_accept(job):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        job.context = contextvars.copy_context()
        task = trio.lowlevel.current_task()
        self.send_waiters[task] = job

        def abort_fn(_: object) -> trio.lowlevel.Abort:
            del self.send_waiters[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort_fn)
        if not job.seq:
            raise RuntimeClosedError

    def _accept(self, job: _Job) -> None:
        self.last_seq += 1
        job.seq = self.last_seq

    def _enqueue(self, job: _Job) -> None:
        self.send_channel.send_nowait(job)
        self.queued += 1

    def _admit_waiter(self) -> _Job:
        """Accept the longest-waiting send(); its task wakes up and returns."""
        task, job = self.send_waiters.popitem(last=False)
        self._accept(job)
        trio.lowlevel.reschedule(task)
        return job

    def _report_accepted(self, job: _Job) -> None:
        if "job_accepted" in self.instruments.hooks:
            self.instruments.call("job_accepted", job.metadata())

    def _report_started(self, job: _Job) -> None:
        job.started_at = trio.current_time()
        if "job_started" in self.instruments.hooks:
            self.instruments.call("job_started", job.metadata())

    # -- running --------------------------------------------------------------------

    def _start(self, job: _Job) -> None:
        """Give ``job`` a slot (one must be free) and start a worker task for it."""
        assert self.jobs_nursery is not None
        self.limiter.acquire_on_behalf_of_nowait(job)
        self.jobs_nursery.start_soon(self._work, job, name="trio_background worker")

    async def _work(self, job: _Job | None) -> None:
        """Run ``job``, then each job its slot is handed, until the queue is empty.

        Reusing the task saves spawning one per job. A job that waited was given a
        copy of its submitter's context; it is called and stepped inside that copy
        (see `_in_context`), so it sees exactly what a task of its own would.
        """
        while job is not None:
            outcome: Outcome = "completed"
            culprit = False
            context = job.context
            try:
                coro = job.fn(*job.args) if context is None else context.run(job.fn, *job.args)
                if type(coro) is not _CoroutineType and not isinstance(coro, Coroutine):
                    raise TypeError(
                        f"background job {job.metadata().name!r} did not return a coroutine "
                        f"(got {type(coro).__name__}): jobs must be async functions"
                    )
                if context is not None:
                    coro = _in_context(context, coro)
                if job.timeout is None:
                    await coro
                else:
                    with trio.move_on_after(job.timeout) as scope:
                        await coro
                    # Past its deadline, even if it shielded itself or swallowed Cancelled.
                    if scope.cancel_called:
                        outcome = "timed_out"
                        _log_job(logging.WARNING, job, f"timed out after {job.timeout:g} seconds")
            except Exception:
                outcome = "failed"
                _log_job(logging.ERROR, job, "failed", exc_info=True)
            except BaseException as exc:
                if not isinstance(exc, trio.Cancelled):
                    outcome = "failed"
                    culprit = True
                self.cut_off()
                raise
            finally:
                following = self._finish(job, outcome, culprit)
            job = following
            if job is not None:
                # Let other tasks run between jobs, as a new task per job would.
                await trio.lowlevel.cancel_shielded_checkpoint()

    @enable_ki_protection
    def _finish(self, job: _Job, outcome: Outcome, culprit: bool) -> _Job | None:
        """Count how ``job`` ended and hand its slot to the next job, if any."""
        if self.cutting_off and not culprit:
            outcome = "cancelled"
            self.cut_cancelled.append(job)
            _log_job(logging.WARNING, job, "cancelled at shutdown")
        if outcome == "completed":
            self.completed += 1
        elif outcome == "failed":
            self.failed += 1
        elif outcome == "timed_out":
            self.timed_out += 1
        else:
            self.cancelled += 1
        self.limiter.release_on_behalf_of(job)
        following: _Job | None = None
        admitted: _Job | None = None  # a waiting send() whose job was just accepted
        if self.cutting_off:
            pass  # nothing starts after a cut-off
        elif self.queued:
            following = self.receive_channel.receive_nowait()
            self.queued -= 1
            if self.send_waiters:
                admitted = self._admit_waiter()
                self._enqueue(admitted)
        elif self.send_waiters:  # only with max_queue_size == 0: straight to the slot
            following = admitted = self._admit_waiter()
        if following is not None:
            self.limiter.acquire_on_behalf_of_nowait(following)
        elif self.is_idle():
            self._on_idle()
        if self.instruments.hooks:
            # The counters already include the admitted job: report its acceptance first.
            if admitted is not None:
                self._report_accepted(admitted)
            if "job_finished" in self.instruments.hooks:
                duration = trio.current_time() - job.started_at
                self.instruments.call("job_finished", job.metadata(), outcome, duration)
            if following is not None:
                self._report_started(following)
        return following

    # -- idleness and shutdown ------------------------------------------------------

    def is_idle(self) -> bool:
        return not self.queued and not self.limiter.borrowed_tokens

    def _on_idle(self) -> None:
        self.idle_lot.unpark_all()
        if self.closed:
            self.done.set()

    async def wait_idle(self) -> None:
        if self.is_idle():
            await trio.lowlevel.checkpoint()
            return
        while not self.is_idle():
            await self.idle_lot.park()

    def check_not_in_job(self, method: str) -> None:
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

    @enable_ki_protection
    def close_intake(self) -> None:
        """Refuse new jobs from now on and wake every waiting send() with an error."""
        if self.closed:
            return
        self.closed = True
        self.send_channel.close()
        waiters = list(self.send_waiters)
        self.send_waiters.clear()
        for task in waiters:
            trio.lowlevel.reschedule(task)  # it finds its job unaccepted and raises
        if self.is_idle():
            self._on_idle()

    @enable_ki_protection
    def cut_off(self) -> None:
        """Cancel every running job and drop every queued one, at once."""
        self.close_intake()
        if self.cutting_off:
            return
        self.cutting_off = True
        while self.queued:
            job = self.receive_channel.receive_nowait()
            self.queued -= 1
            self.dropped += 1
            self.cut_dropped.append(job)
            _log_job(logging.WARNING, job, "dropped at shutdown without starting")
            if "job_dropped" in self.instruments.hooks:
                self.instruments.call("job_dropped", job.metadata())
        if self.jobs_nursery is not None:
            self.jobs_nursery.cancel_scope.cancel()
        if self.is_idle():
            self._on_idle()

    async def _cut_off_and_wait(self) -> None:
        """Cut off, then wait for the cancelled jobs to unwind, so that nothing runs after."""
        self.cut_off()
        with trio.CancelScope(shield=True):
            await self.wait_idle()

    async def aclose(self) -> None:
        self.check_not_in_job("aclose")
        # Only the first call drains against the deadline; later ones wait for it.
        first = not (self.closing or self.cutting_off)
        self.closing = True
        self.close_intake()
        try:
            with trio.move_on_after(self.config.drain_timeout if first else math.inf):
                await self.done.wait()
        except BaseException:
            await self._cut_off_and_wait()
            raise
        if self.done.is_set():
            return
        # The deadline passed. If something else already cut off (the body raised, a job
        # raised KeyboardInterrupt), that path reports; otherwise this call does.
        by_us = not self.cutting_off
        await self._cut_off_and_wait()
        if not by_us:
            return
        cancelled = tuple(job.metadata() for job in sorted(self.cut_cancelled, key=_seq))
        dropped = tuple(job.metadata() for job in self.cut_dropped)
        raise BackgroundShutdownError(
            f"drain timed out after {self.config.drain_timeout} seconds: "
            f"{len(cancelled)} running job(s) cancelled, {len(dropped)} queued job(s) dropped",
            cancelled=cancelled,
            dropped=dropped,
            statistics=self.statistics(),
        )

    def statistics(self) -> BackgroundStatistics:
        return BackgroundStatistics(
            queued=self.queued,
            running=self.limiter.borrowed_tokens,
            completed=self.completed,
            failed=self.failed,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            dropped=self.dropped,
            rejected=self.rejected,
            max_queue_size=self.max_queue_size,
            max_concurrent_tasks=self.max_concurrent_tasks,
            closed=self.closed,
        )

    async def host_jobs(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the nursery the jobs run in, until it is cancelled."""
        async with trio.open_nursery() as nursery:
            self.jobs_nursery = nursery
            task_status.started()
            await trio.sleep_forever()


@types.coroutine
def _in_context(
    context: contextvars.Context, coro: Coroutine[object, object, object]
) -> Generator[object, object, object]:
    """Drive ``coro`` with each of its steps run inside ``context``."""
    run = context.run
    send = coro.send
    value: object = None
    error: BaseException | None = None
    while True:
        try:
            yielded = run(send, value) if error is None else run(coro.throw, error)
        except StopIteration as stop:
            return stop.value
        error = None
        try:
            value = yield yielded
        except BaseException as exc:
            error = exc


def _seq(job: _Job) -> int:
    return job.seq


@final
class BackgroundHandle:
    """Submits jobs to a runtime. Get one from `BackgroundRuntime.handle`.

    Handles are cheap: make as many as you like; they all feed the same queue.
    Both methods must be called from the runtime's Trio thread (from another
    thread, use ``trio.from_thread.run_sync(handle.spawn, ...)``).
    """

    __slots__ = ("_state",)

    def __init__(self, state: _RuntimeState) -> None:
        self._state = state

    def spawn(
        self,
        async_fn: Callable[[Unpack[PosArgsT]], Awaitable[object]],
        *args: Unpack[PosArgsT],
        name: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Submit ``async_fn(*args)`` as a job, without waiting.

        If a slot is free and nothing is queued, the job starts at once (it
        counts as running); otherwise it joins the queue. The coroutine is
        created only when the job starts, in a copy of the caller's
        `contextvars` context.

        Args:
            async_fn: The async function to run. Pass the function, not a coroutine.
            *args: Positional arguments for ``async_fn``.
            name: The job's name in logs, instruments and reports (default:
                ``async_fn.__qualname__``).
            request_id: An id tying the job to a request, for logs and reports.
            timeout: Seconds the job may run before it is cancelled and counted
                as ``timed_out``; overrides `BackgroundTaskConfig.job_timeout`.

        Raises:
            QueueFullError: Every slot is busy and the queue is full (counted in
                `BackgroundStatistics.rejected`).
            RuntimeClosedError: Shutdown has begun.
            TypeError: ``async_fn`` is a coroutine object or not callable, or
                ``name``, ``request_id`` or ``timeout`` has the wrong type.
            ValueError: ``timeout`` is not > 0 (this error is a `TypeError` too).
            RuntimeError: Called from a thread other than the runtime's.
        """
        state = self._state
        state.spawn(state.make_job("spawn", async_fn, args, name, request_id, timeout))

    async def send(
        self,
        async_fn: Callable[[Unpack[PosArgsT]], Awaitable[object]],
        *args: Unpack[PosArgsT],
        name: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-job limit, not for this call)
    ) -> None:
        """Submit ``async_fn(*args)`` as a job, waiting while the queue is full.

        Takes the same arguments as `spawn`. This is a checkpoint. Tasks waiting
        here are accepted in the order they arrived, as soon as there is room.

        Raises:
            RuntimeClosedError: Shutdown began before or while waiting.
            TypeError: As for `spawn`.
            ValueError: As for `spawn`.
            RuntimeError: Called from a thread other than the runtime's.
        """
        state = self._state
        await state.send(state.make_job("send", async_fn, args, name, request_id, timeout))

    def __repr__(self) -> str:
        return f"<trio_background.BackgroundHandle at {id(self):#x}>"


@final
class BackgroundRuntime:
    """A running set of background jobs. Created by `open_background_runtime`."""

    __slots__ = ("_state",)

    def __init__(self, state: _RuntimeState) -> None:
        self._state = state

    def handle(self) -> BackgroundHandle:
        """Return a new handle that submits jobs to this runtime."""
        return BackgroundHandle(self._state)

    def statistics(self) -> BackgroundStatistics:
        """Return a snapshot of the queue, the slots and the job counters."""
        return self._state.statistics()

    async def wait_idle(self) -> None:
        """Wait until no job is queued or running.

        Raises:
            RuntimeError: Called from inside one of this runtime's own jobs.
        """
        self._state.check_not_in_job("wait_idle")
        await self._state.wait_idle()

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
        await self._state.aclose()

    def __repr__(self) -> str:
        state = self._state
        status = "closed" if state.closed else "open"
        return (
            f"<trio_background.BackgroundRuntime at {id(self):#x}, {status}, "
            f"{state.limiter.borrowed_tokens}/{state.max_concurrent_tasks} running, "
            f"{state.queued}/{state.max_queue_size} queued>"
        )


def _base_exception_to_raise(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Pick the KeyboardInterrupt/SystemExit a job raised out of our nurseries' group."""
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif not isinstance(exc, (Exception, trio.Cancelled)):
            return exc
    return group


def open_background_runtime(
    config: BackgroundTaskConfig | None = None,
    *,
    instruments: Iterable[object] = (),
) -> AbstractAsyncContextManager[BackgroundRuntime]:
    """Open a runtime that runs background jobs until the block ends.

    The runtime owns a nursery: no job outlives the ``async with`` block. When
    the block ends normally the runtime calls `BackgroundRuntime.aclose`, which
    drains (and may raise `BackgroundShutdownError`). If the body raises or is
    cancelled, the runtime does not drain: it cancels running jobs, drops
    queued ones, logs them, and the body's exception propagates unchanged.

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
    return _open(_RuntimeState(config, hooks))


@asynccontextmanager
async def _open(state: _RuntimeState) -> AsyncIterator[BackgroundRuntime]:
    pending: BaseException | None = None
    try:
        async with trio.open_nursery() as root:
            await root.start(state.host_jobs)
            assert state.jobs_nursery is not None
            try:
                yield BackgroundRuntime(state)
            except BaseException as exc:
                state.cut_off()
                pending = exc
            else:
                try:
                    await state.aclose()
                except BaseException as exc:
                    pending = exc
            finally:
                state.jobs_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _base_exception_to_raise(group) from None
    if pending is not None:
        try:
            raise pending
        finally:
            del pending
