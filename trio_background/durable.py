"""Durable jobs: a queue in a store that outlives the process, run through a runtime.

A job enqueued on a `DurableQueue` is committed to its store before `DurableQueue.enqueue`
returns. `DurableQueue.serve` claims stored jobs while a runtime has room, runs each one
through that runtime (its slots, order, timeouts, logging, instruments and shutdown
report), and records how each ended. A worker that dies loses nothing: its claims are
leases, and a job whose lease runs out is claimed again. Jobs run at least once, so their
side effects must be idempotent. See the "Durable jobs" page of the docs::

    from trio_background import Retry, open_background_runtime
    from trio_background.durable import TaskRegistry, open_sqlite_queue

    tasks = TaskRegistry()

    @tasks.task(retry=Retry(attempts=5), timeout=60)
    async def send_email(address: str, subject: str) -> None: ...

    async with open_sqlite_queue("jobs.db", tasks) as queue:
        job_id = await queue.enqueue(send_email, "ada@example.com", "Hi")
        async with open_background_runtime() as runtime:
            async with trio.open_nursery() as nursery:
                await nursery.start(queue.serve, runtime)

.. versionadded:: 2.0
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import random
import socket
import sys
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, overload

import attrs
import trio

from ._config import Retry, check_finite_seconds, check_timeout
from ._exceptions import RuntimeClosedError
from ._job import CANCELLED, COMPLETED, DROPPED, FAILED, TIMED_OUT, make_job
from ._runtime import BackgroundRuntime
from ._shutdown import Phase
from ._store import (
    Claim,
    NewJob,
    Outcome,
    SchemaVersionError,
    SQLiteStore,
    Store,
    encode,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    from ._job import BackgroundJob
    from ._runtime import Runtime

    PosArgsT = TypeVarTuple("PosArgsT")

__all__ = [
    "DeadLetter",
    "DurableQueue",
    "DurableStatistics",
    "SchemaVersionError",
    "TaskRegistry",
    "open_sqlite_queue",
]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

logger = logging.getLogger("trio_background")

#: Each durable run is one run in the runtime: retries are the queue's, durable.
_ONE_RUN: Final = Retry(attempts=1)

#: Seconds between two looks at whether the runtime has room again.
ROOM_POLL_INTERVAL: Final = 0.05

#: Seconds the recorder waits for more outcomes before it writes a batch.
RECORD_LINGER: Final = 0.002


def _room(inner: Runtime) -> int:
    """How many more jobs ``inner`` can take without one waiting beyond its free places.

    Free queue places and free slots, less what serve() calls reserved for claims.
    """
    admission = inner.admission
    free_slots = max(0, admission.max_concurrent_tasks - admission.limiter.borrowed_tokens)
    return (admission.max_queue_size - admission.taken) + free_slots - inner.reserved


def _batch(inner: Runtime) -> int:
    """The room worth a claim while the runtime is busy: half its places and slots."""
    admission = inner.admission
    return max(1, (admission.max_queue_size + admission.max_concurrent_tasks) // 2)


def _busy(inner: Runtime) -> bool:
    """Whether ``inner`` has as many jobs queued as it has slots: a round of work."""
    admission = inner.admission
    return admission.taken >= admission.max_concurrent_tasks


@attrs.frozen
class Task:
    """A registered task: a function, the name it is stored under, and how it runs."""

    fn: Callable[..., Awaitable[Any]]
    name: str
    retry: Retry | None
    timeout: float | None

    @property
    def attempts(self) -> int:
        return 1 if self.retry is None else self.retry.attempts


class TaskRegistry:
    """The functions a durable queue may run, each under a stable name.

    A stored job names its task; a worker finds the function by that name, so the
    name must not change while jobs of it are stored. Register functions with the
    `task` decorator at import time, in a module both the enqueueing code and the
    workers import.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, Task] = {}
        self._by_fn: dict[Callable[..., Awaitable[Any]], Task] = {}

    @overload
    def task(self, fn: F, /) -> F: ...

    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...

    def task(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Register an async function as a task; returns the function unchanged.

        Use it bare (``@tasks.task``) or with options (``@tasks.task(name=...)``).

        Args:
            fn: The async function.
            name: The name jobs of this task are stored under (default:
                ``f"{fn.__module__}.{fn.__qualname__}"``).
            retry: How to retry a failed run (default: never; each run is one
                attempt). A worker that dies during a run uses up an attempt too.
            timeout: Seconds a run may take before it is cancelled and counts as
                a failure (`trio.TooSlowError`); `None` for the runtime's
                ``job_timeout``.

        Raises:
            ValueError: Another function is registered under ``name``, or this one
                under another name.
            TypeError: ``fn`` is not an async function, or an option has the wrong
                type.
        """
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry or None, not {type(retry).__name__}")
        check_timeout("timeout", timeout, allow_none=True, allow_zero=False)

        def register(fn: F) -> F:
            if not (
                inspect.iscoroutinefunction(fn)
                or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
            ):
                raise TypeError(
                    f"a task must be an async function (async def), not {fn!r}: to run a "
                    f"blocking function, register an async one that calls "
                    f"trio.to_thread.run_sync"
                )
            task_name = name
            if task_name is None:
                task_name = f"{fn.__module__}.{fn.__qualname__}"
            task = Task(fn, task_name, retry, None if timeout is None else float(timeout))
            other = self._by_name.get(task_name)
            if other is not None and other.fn is not fn:
                raise ValueError(
                    f"task name {task_name!r} is taken by {other.fn!r}: give one of them "
                    f"another name= "
                )
            known = self._by_fn.get(fn)
            if known is not None and known.name != task_name:
                raise ValueError(f"{fn!r} is registered already, as {known.name!r}")
            self._by_name[task_name] = self._by_fn[fn] = task
            return fn

        if fn is None:
            return register
        return register(fn)

    def get(self, name: str) -> Task | None:
        """The task registered under ``name``, if any."""
        return self._by_name.get(name)

    def of(self, fn: object) -> Task | None:
        """The task of function ``fn``, if it is registered."""
        try:
            return self._by_fn.get(fn)  # type: ignore[call-overload, no-any-return]
        except TypeError:  # unhashable
            return None

    def __iter__(self) -> Any:
        return iter(self._by_name.values())

    def __repr__(self) -> str:
        return f"<trio_background.durable.TaskRegistry of {len(self._by_name)} tasks>"


@attrs.frozen
class DurableStatistics:
    """A snapshot of a durable queue, taken in one transaction.

    Every stored job is counted under exactly one of ``pending``,
    ``scheduled``, ``running``, ``completed`` and ``dead``.
    """

    #: Jobs ready to be claimed (a delayed job that is due included).
    pending: int
    #: Jobs not due yet: delayed, or waiting to be retried.
    scheduled: int
    #: Jobs claimed by a worker (under a lease).
    running: int
    #: Jobs that completed, including those whose records were deleted since.
    completed: int
    #: Jobs in the dead letters.
    dead: int
    #: Retries: failed runs run again, and runs whose worker was lost.
    retried: int


@attrs.frozen
class DeadLetter:
    """A job that will not run again unless it is requeued."""

    #: The job's id.
    job_id: str
    #: Its task's name.
    task: str
    #: Its arguments (None if they could not be decoded).
    args: list[Any] | None
    #: The runs it was given.
    attempts: int
    #: Why it died: the last run's error, or what was wrong with it.
    error: str | None


class _Watch:
    """Stands in the job's end-of-life slot: told when the job ends, awaitable like an event.

    `BackgroundJob` keeps a `trio.Event` there for `BackgroundJob.wait`; this object
    does that job too, and tells the queue the outcome first, in the same step.
    """

    __slots__ = ("claim", "event", "job", "queue", "task")

    def __init__(
        self, queue: DurableQueue, job: BackgroundJob[Any], claim: Claim, task: Task
    ) -> None:
        self.queue: DurableQueue | None = queue
        self.job: BackgroundJob[Any] | None = job  # (a cycle until the job ends)
        self.claim = claim
        self.task = task
        self.event: trio.Event | None = None

    def set(self) -> None:
        queue, job = self.queue, self.job
        self.queue = self.job = None
        if queue is not None and job is not None:
            queue._ended(job, self.claim, self.task)
        if self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if self.event is None:
            self.event = trio.Event()
        await self.event.wait()


class DurableQueue:
    """A queue of durable jobs in a store.

    Made by `open_sqlite_queue` (processes on one machine) or
    `trio_background.redis.open_redis_queue` (workers on any number of machines).
    Enqueue from any task of the Trio run that opened it; serve it into a runtime
    with `serve`. Several processes may serve one store at once.
    """

    def __init__(
        self,
        store: Store,
        registry: TaskRegistry,
        *,
        lease: float,
        max_pending: int | None,
        keep_completed: float,
        nursery: trio.Nursery,
    ) -> None:
        self._store = store
        self._registry = registry
        self._lease = lease
        self._max_pending = max_pending
        self._keep_completed = keep_completed
        self._nursery = nursery
        self._worker = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # Claims of this process not yet recorded, by job id: their leases are renewed.
        self._held: dict[str, str] = {}
        # Outcomes waiting to be recorded, and the event that wakes the recorder.
        self._outcomes: deque[Outcome] = deque()
        self._to_record = trio.Event()
        self._recorded = trio.Event()  # set after each batch: a job ended, room may be free
        self._enqueued = trio.Event()  # set by enqueue: work for a serve() of this process
        self._claiming = 0  # claims under way (close() waits for them)
        self._claimed = trio.Event()  # set (and replaced) as each claim returns
        self._writing = 0  # batches of outcomes being written now
        self._writing_tokens: set[str] = set()  # the claims of the outcomes being written
        self._written = trio.Event()  # set (and replaced) after each batch is written
        self._closed = False  # no more enqueue() or serve()
        self._gone = False  # closed, and every claim recorded or given back
        self._recorder_started = False

    # -- enqueueing ---------------------------------------------------------------------------

    async def enqueue(
        self,
        fn: Callable[[Unpack[PosArgsT]], Awaitable[Any]],
        *args: Unpack[PosArgsT],
        delay: float | None = None,
        request_id: str | None = None,
        dedupe_key: str | None = None,
    ) -> str:
        """Store a job that runs ``fn(*args)``; it is durable when this returns.

        Args:
            fn: A function registered in the queue's `TaskRegistry`.
            *args: Its arguments: JSON values that come back equal from a JSON round
                trip (lists, not tuples; dicts with `str` keys; no NaN).
            delay: Seconds before the job may be claimed (`None` or 0: at once).
            request_id: An id tying the job to a request (the job sees it as
                ``current_job().metadata.request_id``).
            dedupe_key: While a job enqueued with this key is unfinished (not
                completed and not dead), store nothing and return that job's id.

        Returns:
            The job's id.

        Raises:
            TypeError: ``fn`` is not registered, an argument is not JSON, or an
                option has the wrong type.
            ValueError: ``delay`` is out of range.
            QueueFullError: ``max_pending`` jobs are unfinished.
            RuntimeClosedError: The queue is closed.
        """
        task = self._registry.of(fn)
        if task is None:
            raise TypeError(
                f"{fn!r} is not a registered task: decorate it with @registry.task, "
                f"using the TaskRegistry this queue was opened with"
            )
        check_finite_seconds("delay", delay, allow_none=True, allow_zero=True)
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, not {type(request_id).__name__}")
        if dedupe_key is not None and not isinstance(dedupe_key, str):
            raise TypeError(f"dedupe_key must be a str or None, not {type(dedupe_key).__name__}")
        for field, text in (("request_id", request_id), ("dedupe_key", dedupe_key)):
            if text is not None and not _is_utf8(text):
                raise ValueError(f"{field} must be text that UTF-8 can encode (no lone surrogates)")
        payload = encode(args)
        if self._closed:
            raise RuntimeClosedError("durable queue is closed")
        not_before = self._store.clock() + (float(delay) if delay else 0.0)
        job_id = await self._store.enqueue(
            NewJob(task.name, payload, not_before, request_id, dedupe_key), self._max_pending
        )
        self._enqueued.set()
        return job_id

    # -- serving ------------------------------------------------------------------------------

    async def serve(
        self,
        runtime: BackgroundRuntime,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Claim jobs while ``runtime`` has room and run them there, until cancelled.

        It never holds more claimed jobs that have not started than the runtime
        has free queue places (and free slots), so a busy runtime leaves work in
        the store for other workers. Each outcome is recorded as the job ends: a
        completed job is done; a failed run is retried by the task's
        `~trio_background.Retry`
        after its backoff, or goes to the dead letters; a job the runtime
        cancels or drops at shutdown is given back for another worker at once.
        Claimed jobs keep their leases while they run, also after this was
        cancelled, for as long as the queue is open. Returns when the runtime
        closes.

        Use it with `trio.Nursery.start`: it reports started once it serves.
        """
        if not isinstance(runtime, BackgroundRuntime):
            raise TypeError(
                f"serve() needs the BackgroundRuntime of open_background_runtime(), "
                f"not {type(runtime).__name__}"
            )
        inner: Runtime = runtime._runtime
        inner.check_thread("serve", "run(queue.serve, runtime)")
        if self._closed:
            raise RuntimeClosedError("durable queue is closed")
        self._start_recording()
        task_status.started()
        while inner.shutdown.phase is Phase.OPEN and not self._closed:
            room = _room(inner)
            if room <= 0 or (room < _batch(inner) and _busy(inner)):
                # No room; or little room while the runtime has a round of work queued
                # for its slots: wait for more, so that claims come in batches (each
                # claim is a store call) and no slot goes idle meanwhile.
                with trio.move_on_after(ROOM_POLL_INTERVAL):
                    await self._recorded.wait()
                self._recorded = trio.Event()
                continue
            self._enqueued = trio.Event()
            # The room is reserved from the claim until each claimed job is in the runtime
            # (another serve() into it sees the room taken); what was claimed beyond the
            # room left once the claim is back (jobs spawned meanwhile took some) is given
            # back at once.
            reserved = [room]
            inner.reserved += room
            self._claiming += 1
            try:
                try:
                    # Shielded: a claim the store made is never dropped on the floor by a
                    # cancellation (its jobs would wait out their leases); if this task
                    # was cancelled meanwhile, the claimed jobs are given back below.
                    with trio.CancelScope(shield=True):
                        claims = await self._store.claim(
                            self._worker, room, self._lease, self._attempts_of
                        )
                finally:
                    self._claiming -= 1
                    self._claimed.set()
                    self._claimed = trio.Event()
                inner.reserved -= room - len(claims)
                reserved[0] = len(claims)
                if not claims:
                    await self._store.idle(self._enqueued)
                    continue
                keep = 0 if self._closed else max(0, _room(inner) + reserved[0])
                if keep < len(claims):
                    for claim in claims[keep:]:
                        self._outcomes.append(Outcome(claim.job_id, claim.token, "release"))
                    self._to_record.set()
                    inner.reserved -= len(claims) - keep
                    reserved[0] = keep
                    del claims[keep:]
                if claims and not await self._submit(inner, claims, reserved):
                    return
            finally:
                inner.reserved -= reserved[0]

    def _attempts_of(self, name: str) -> int:
        task = self._registry.get(name)
        return 1 if task is None else task.attempts

    async def _submit(self, inner: Runtime, claims: list[Claim], reserved: list[int]) -> bool:
        """Send each claimed job to the runtime; False if the runtime closed meanwhile.

        Each job sent (or dead-lettered) gives up its part of the room ``reserved``.
        """
        for claim in claims:
            self._held[claim.job_id] = claim.token
        sent = 0
        try:
            for claim in claims:
                job = self._job_of(inner, claim)
                if job is not None:
                    await inner.admission.send(job)
                sent += 1
                inner.reserved -= 1
                reserved[0] -= 1
        except RuntimeClosedError:
            return False
        finally:
            # Claims not handed over (the runtime closed, or this task was cancelled) go
            # back to the store at once.
            for claim in claims[sent:]:
                self._outcomes.append(Outcome(claim.job_id, claim.token, "release"))
            if sent < len(claims):
                self._to_record.set()
        return True

    def _job_of(self, inner: Runtime, claim: Claim) -> BackgroundJob[Any] | None:
        """The runtime's job for ``claim``; None (and dead-lettered) if it cannot run."""
        task = self._registry.get(claim.task)
        if task is None:
            self._dead(claim, f"unknown task {claim.task!r}: no such task is registered")
            return None
        try:
            args = json.loads(claim.payload)
            if not isinstance(args, list):
                raise ValueError(f"expected a JSON array, got {type(args).__name__}")
        except Exception as exc:  # (a ValueError, or a RecursionError for deep nesting)
            self._dead(claim, f"payload could not be decoded: {type(exc).__name__}: {exc}")
            return None
        try:
            job = make_job(
                inner,
                "send",
                task.fn,
                tuple(args),
                task.name,
                claim.request_id,
                task.timeout,
                None,
                _ONE_RUN,
                None,
            )
        except Exception as exc:  # the stored job cannot be made a job: it never will be
            self._dead(claim, f"cannot run: {type(exc).__name__}: {exc}")
            return None
        assert job._sched is not None
        job._sched.attempt = claim.attempt
        job._value = _Watch(self, job, claim, task)
        return job

    def _dead(self, claim: Claim, error: str) -> None:
        logger.error(
            "durable job %s (%s) is dead: %s",
            claim.job_id,
            claim.task,
            error,
            extra={"job_name": claim.task, "request_id": claim.request_id},
        )
        self._outcomes.append(Outcome(claim.job_id, claim.token, "dead", error))
        self._to_record.set()

    def _ended(self, job: BackgroundJob[Any], claim: Claim, task: Task) -> None:
        """A durable job's run ended (called by the runtime, in its bookkeeping step).

        Never raises, and only notes the outcome: the recorder task stores it.
        """
        if self._gone:
            return  # (its claim was given back when the queue closed)
        cut_off = job._runtime.shutdown.phase is Phase.CUT_OFF
        job_state = job._state
        error: BaseException | None = job._value[0] if job_state is FAILED else None
        if job_state is COMPLETED:
            outcome = Outcome(claim.job_id, claim.token, "complete")
        elif (job_state is FAILED and isinstance(error, Exception)) or job_state is TIMED_OUT:
            if job_state is TIMED_OUT:
                error = trio.TooSlowError()
                text = f"timed out after {job._timeout or 0:g} seconds"
            else:
                assert error is not None
                text = "".join(traceback.format_exception_only(type(error), error)).strip()
            retry = task.retry
            if retry is not None and claim.attempt < retry.attempts and isinstance(error, retry.on):
                delay = retry.delay(claim.attempt, random.random)
                outcome = Outcome(claim.job_id, claim.token, "retry", text, delay)
                assert job._sched is not None
                job._sched.retry_elsewhere = (delay, retry.attempts)  # (logged as a retry)
            else:
                outcome = Outcome(claim.job_id, claim.token, "dead", text)
        elif (job_state is CANCELLED or job_state is DROPPED) and not cut_off:
            # Cancelled through its handle (current_job().cancel(), say): on purpose.
            outcome = Outcome(claim.job_id, claim.token, "dead", "cancelled through its handle")
        else:
            # Cut off by the runtime's shutdown, or ended by KeyboardInterrupt/SystemExit
            # (the process is going down): not the job's fault; another worker runs it.
            outcome = Outcome(claim.job_id, claim.token, "release")
        self._outcomes.append(outcome)
        self._to_record.set()

    # -- the queue's own tasks ---------------------------------------------------------------

    def _start_recording(self) -> None:
        if not self._recorder_started:
            self._recorder_started = True
            self._nursery.start_soon(self._record_outcomes)
            self._nursery.start_soon(self._renew_leases)

    async def _record_outcomes(self) -> None:
        while True:
            await self._to_record.wait()
            # Outcomes of jobs ending together are written together (one store call):
            # let the ones ending in the next moment join this batch.
            await trio.sleep(RECORD_LINGER)
            self._to_record = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        while self._outcomes:
            batch = list(self._outcomes)
            self._outcomes.clear()
            self._writing += 1
            self._writing_tokens.update(outcome.token for outcome in batch)
            try:
                with trio.CancelScope(shield=True):
                    held = await self._store.record(batch)
            except BaseException:
                # Not recorded: kept, for the next flush (or, if the process goes down,
                # for the leases to run out and another worker to run the jobs again).
                self._outcomes.extendleft(reversed(batch))
                raise
            finally:
                self._writing -= 1
                self._writing_tokens.difference_update(outcome.token for outcome in batch)
                self._written.set()
                self._written = trio.Event()
            for outcome, ok in zip(batch, held, strict=True):
                if self._held.get(outcome.job_id) == outcome.token:  # (not a newer claim's)
                    del self._held[outcome.job_id]
                if not ok and outcome.verdict != "release":
                    logger.warning(
                        "durable job %s: its lease was lost (another worker claimed it): "
                        "this run's outcome is ignored",
                        outcome.job_id,
                    )
            self._recorded.set()

    async def _renew_leases(self) -> None:
        while True:
            await trio.sleep(self._lease / 3)
            if self._held:
                claims = list(self._held.items())
                lost = await self._store.renew(claims, self._lease)
                ending = self._writing_tokens | {o.token for o in self._outcomes} if lost else ()
                for job_id, token in claims:
                    if token in ending:
                        continue  # (its outcome was written meanwhile, or is on its way)
                    if job_id in lost and self._held.get(job_id) == token:
                        del self._held[job_id]
                        logger.warning(
                            "durable job %s: its lease expired before it was renewed; "
                            "another worker may run it too",
                            job_id,
                        )

    async def _purge(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._store.purge(self._store.clock() - self._keep_completed)
            await trio.sleep(min(30.0, max(self._keep_completed, 1.0)))

    async def _close(self) -> None:
        self._closed = True
        # A serve() that outlives the queue stops at its next step; a claim it has under
        # way is given back as soon as it returns: wait for that.
        while self._claiming:
            await self._claimed.wait()
        await self._settle()  # (also what the recorder is writing now: its claims stay held)
        # Jobs still running in a runtime of this process (one that outlives the queue):
        # give them back; whatever they do from now on is not recorded.
        claims = list(self._held.items())
        self._held.clear()
        self._gone = True
        if claims:
            with trio.CancelScope(shield=True):
                await self._store.record([Outcome(j, t, "release") for j, t in claims])

    # -- inspecting ---------------------------------------------------------------------------

    async def _settle(self) -> None:
        """Record every outcome noted so far: what this process did, it reads back."""
        while self._outcomes or self._writing:
            if self._outcomes:
                await self._flush()
            else:
                await self._written.wait()

    async def statistics(self) -> DurableStatistics:
        """Count the queue's jobs, all at one instant (one transaction).

        Outcomes of this process's jobs that ended before the call are recorded
        first, so a process always sees its own jobs' ends.
        """
        await self._settle()
        c = await self._store.counts()
        return DurableStatistics(c.pending, c.scheduled, c.running, c.completed, c.dead, c.retried)

    async def status(self, job_id: str) -> str | None:
        """Return where a job is: its status name, or `None` for an unknown id.

        One of ``"pending"`` (ready to be claimed), ``"scheduled"`` (not due yet,
        or waiting to be retried), ``"running"`` (claimed by a worker),
        ``"completed"`` or ``"dead"``. A completed job's record is deleted
        ``keep_completed`` seconds after it ended; its id is unknown from then on.
        """
        if not isinstance(job_id, str):
            raise TypeError(f"job_id must be a str, not {type(job_id).__name__}")
        await self._settle()
        return await self._store.status(job_id)

    async def dead_letters(self) -> list[DeadLetter]:
        """The jobs in the dead letters, oldest first."""
        letters = []
        await self._settle()
        for dead in await self._store.dead_jobs():
            try:
                args = json.loads(dead.payload)
            except Exception:  # (ValueError; RecursionError for a deeply nested one)
                args = None
            if not isinstance(args, list):
                args = None
            letters.append(DeadLetter(dead.job_id, dead.task, args, dead.attempts, dead.error))
        return letters

    async def requeue(self, job_id: str) -> None:
        """Move a dead job back to pending, with a fresh count of attempts.

        Raises:
            ValueError: No job has this id, or the job is not dead.
        """
        if not isinstance(job_id, str):
            raise TypeError(f"job_id must be a str, not {type(job_id).__name__}")
        if not await self._store.requeue(job_id):
            raise ValueError(f"no dead job has the id {job_id!r}")
        self._enqueued.set()

    def __repr__(self) -> str:
        return f"<trio_background.durable.DurableQueue {self._store!r}>"


@contextlib.asynccontextmanager
async def open_sqlite_queue(
    path: str | os.PathLike[str],
    registry: TaskRegistry,
    *,
    lease: float = 30.0,
    max_pending: int | None = None,
    keep_completed: float = 86400.0,
) -> AsyncIterator[DurableQueue]:
    """Open the durable queue kept in the SQLite file ``path`` (created if missing).

    Args:
        path: The database file. Every process serving or enqueueing on this queue
            opens the same file; it must be on a local disk (SQLite's WAL mode does not
            work over a network file system).
        registry: The tasks jobs may name.
        lease: Seconds a claim lasts without renewal; a job whose worker died runs
            again this long after it was last renewed. Renewals come every third of it.
        max_pending: Refuse `DurableQueue.enqueue` with
            `~trio_background.QueueFullError` while this
            many jobs are unfinished (`None`: no limit).
        keep_completed: Seconds a completed job's record is kept (then deleted within
            a minute; the ``completed`` count keeps it).

    Raises:
        SchemaVersionError: The file holds another version's schema, or something else.
    """
    _check_options(registry, lease, max_pending, keep_completed)
    store = await trio.to_thread.run_sync(SQLiteStore, os.fspath(path))
    async with _open_queue(store, registry, lease, max_pending, keep_completed) as queue:
        yield queue


def _check_options(
    registry: TaskRegistry, lease: float, max_pending: int | None, keep_completed: float
) -> None:
    """Check the options every durable queue takes (`TypeError`/`ValueError` naming them)."""
    check_finite_seconds("lease", lease, allow_none=False, allow_zero=False)
    check_timeout("keep_completed", keep_completed, allow_none=False, allow_zero=True)
    if max_pending is not None:
        if not isinstance(max_pending, int) or isinstance(max_pending, bool):
            raise TypeError(f"max_pending must be an int or None, not {type(max_pending).__name__}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1 or None, got {max_pending}")
    if not isinstance(registry, TaskRegistry):
        raise TypeError(f"registry must be a TaskRegistry, not {type(registry).__name__}")


@contextlib.asynccontextmanager
async def _open_queue(
    store: Store,
    registry: TaskRegistry,
    lease: float,
    max_pending: int | None,
    keep_completed: float,
    worker: str | None = None,
) -> AsyncIterator[DurableQueue]:
    """A `DurableQueue` on an open ``store``, which it closes on the way out.

    ``worker`` names this process to the store (default: host, PID and the queue's id).
    An exception from the block leaves it as it was raised, not inside the queue's own
    nursery's exception group.
    """
    body: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            queue = DurableQueue(
                store,
                registry,
                lease=float(lease),
                max_pending=max_pending,
                keep_completed=float(keep_completed),
                nursery=nursery,
            )
            if worker is not None:
                queue._worker = worker
            nursery.start_soon(queue._purge)
            try:
                yield queue
            except BaseException as exc:
                body = exc  # (raised again below, once the nursery has closed)
            finally:
                with trio.CancelScope(shield=True):
                    await queue._close()
                nursery.cancel_scope.cancel()
    except BaseException as exc:
        if body is None:
            raise
        raise BaseExceptionGroup("errors in a durable queue", [body, exc]) from None
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
    if body is not None:
        raise body


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fixup_module_metadata() -> None:
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_background._"):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
