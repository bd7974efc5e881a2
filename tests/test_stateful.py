"""Model-based stateful test: a real runtime and a tiny pure-Python model, side by side.

A hypothesis ``RuleBasedStateMachine`` draws random rules -- spawn, send (a helper task
that blocks while the queue is full), cancel a waiting send, let a job complete or fail,
advance the virtual clock (jobs time out, the drain deadline fires), start ``aclose()``
(several times, concurrently), cancel the task awaiting it, leave the ``async with``
block (its implicit ``aclose()``), raise in the block's body, cancel the body -- and
applies each one to a real runtime and to `Model`. After every step the two must agree
exactly: statistics, acceptance order, which jobs started and when, how and when each
ended, what every ``send``/``aclose``/body returned or raised, what the instrument hooks
and the log saw. Caps, the accounting identity and work conservation are checked after
every single Trio task step as well.

How Trio is driven from the (synchronous) state machine
-------------------------------------------------------
Each example runs ``trio.run`` in a background thread (`Harness`). Every rule calls
``trio.from_thread.run(...)`` with the run's ``TrioToken`` to execute one step inside
Trio, and the step ends with ``trio.testing.wait_all_tasks_blocked()``, so when the rule
returns the runtime is quiescent and the model can be compared with it. Time is a
``trio.testing.MockClock`` whose ``autojump_threshold`` is 0 *during* a step (so
"advance 1.5 s" is just ``await trio.sleep(1.5)``, and every job timeout or drain
deadline in between fires at its exact virtual instant) and ``inf`` *between* steps,
so virtual time cannot jump on its own while the state machine is thinking. This is
deterministic (no wall-clock races: the hypothesis thread blocks while Trio works, and
importing hypothesis makes Trio's scheduler seeded per example), needs no greenlets, and
keeps hypothesis's own stateful machinery (rule selection, shrinking, the printed
reproducer). The alternative -- drawing a list of actions and interpreting it in one
``trio.run`` -- loses the stateful shrinker and the readable step-by-step reproducer.

Ties are excluded by construction so every step has one correct outcome: clock steps
and job timeouts are multiples of 0.5 s, so job deadlines are too, while the drain
timeout is 0, inf, or ends in .25/.75, so the drain deadline never coincides with a job
deadline.

Example counts: 120 programs of up to 30 steps in CI (about 10 s); set
``TRIO_BACKGROUND_LONG=1`` to use the "long" hypothesis profile registered here (3000
programs of up to 60 steps) for a long run.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio
import trio.testing
from helpers import LONG, PROFILE
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from trio_background import (
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)

T = TypeVar("T")


#: Set by the task that submits a job, right before submitting; the job must see it.
SUBMITTER: contextvars.ContextVar[str] = contextvars.ContextVar("SUBMITTER")

#: A result of aclose() or of the async-with body, as compared between model and runtime:
#: ("waiting",), ("none",), ("ok",), ("cancelled",), ("raised",) or
#: ("shutdown", cancelled, dropped) with tuples of (name, request_id).
Result = tuple[object, ...]
WAITING: Result = ("waiting",)
NONE: frozenset[Result] = frozenset({("none",)})

configs = st.builds(
    BackgroundTaskConfig,
    max_queue_size=st.integers(0, 3),
    max_concurrent_tasks=st.integers(1, 3),
    drain_timeout=st.sampled_from([0.0, 0.25, 1.25, 2.75, math.inf]),
    job_timeout=st.sampled_from([None, 1.0, 2.5]),
)
job_timeouts = st.sampled_from([None, None, 0.5, 1.5, 2.5, math.inf])


class BodyError(Exception):
    """Raised in the body of the ``async with`` block by the shut_down rule."""


def meta_key(job: BackgroundJobMetadata) -> tuple[str, str | None]:
    return (job.name, job.request_id)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@attrs.define
class MJob:
    name: str
    request_id: str | None
    timeout: float  # effective time limit (inf: none)
    state: str = "queued"  # queued running completed failed timed_out cancelled dropped
    release: str | None = None  # "complete" / "fail": set by the release rule
    start: float | None = None
    end: float | None = None


@attrs.define
class MCloser:
    kind: str  # "helper" (a task awaiting aclose()) or "body" (the implicit aclose)
    primary: bool = False
    result: frozenset[Result] | None = None  # acceptable results; None while waiting


class Model:
    """What the contract says the runtime must be doing, in plain Python."""

    def __init__(self, config: BackgroundTaskConfig) -> None:
        self.cap = config.max_concurrent_tasks
        self.qmax = config.max_queue_size
        self.drain_timeout = config.drain_timeout
        self.job_timeout = config.job_timeout
        self.now = 0.0
        self.jobs: dict[str, MJob] = {}  # acceptance order
        self.queue: list[MJob] = []
        self.running: list[MJob] = []
        self.waiting: list[tuple[str, str | None, float | None]] = []  # blocked send()s
        self.senders: dict[str, str] = {}  # waiting accepted closed cancelled
        self.rejected = 0
        self.closed = False
        self.phase = "open"  # open, draining (aclose in progress), done
        self.cut = False
        self.drain_deadline: float | None = None
        self.report: Result | None = None
        self.closers: list[MCloser] = []
        self.body = "in_block"  # in_block, exiting (awaiting its aclose), done
        self.body_result: frozenset[Result] | None = None

    # -- views -------------------------------------------------------------------------

    def statistics(self) -> BackgroundStatistics:
        count = Counter(j.state for j in self.jobs.values())
        return BackgroundStatistics(
            scheduled=0,
            queued=len(self.queue),
            running=len(self.running),
            completed=count["completed"],
            failed=count["failed"],
            timed_out=count["timed_out"],
            cancelled=count["cancelled"],
            dropped=count["dropped"],
            rejected=self.rejected,
            max_queue_size=self.qmax,
            max_concurrent_tasks=self.cap,
            closed=self.closed,
            accepted=len(self.jobs),
            retried=0,
        )

    def idle(self) -> bool:
        return not self.queue and not self.running

    def primary(self) -> MCloser | None:
        for closer in self.closers:
            if closer.primary:
                return closer
        return None

    def draining_helper(self) -> bool:
        primary = self.primary()
        return self.phase == "draining" and primary is not None and primary.kind == "helper"

    # -- submission --------------------------------------------------------------------

    def effective_timeout(self, timeout: float | None) -> float:
        limit = timeout if timeout is not None else self.job_timeout
        return math.inf if limit is None else limit

    def accept(self, name: str, request_id: str | None, timeout: float | None) -> None:
        job = MJob(name, request_id, self.effective_timeout(timeout))
        self.jobs[name] = job
        if len(self.running) < self.cap and not self.queue:
            self.start(job)
        else:
            self.queue.append(job)

    def has_room(self) -> bool:
        return len(self.running) < self.cap or len(self.queue) < self.qmax

    def spawn(self, name: str, request_id: str | None, timeout: float | None) -> str:
        if self.closed:
            return "closed"
        if not self.has_room():
            self.rejected += 1
            return "full"
        self.accept(name, request_id, timeout)
        self.settle()
        return "accepted"

    def send(self, name: str, request_id: str | None, timeout: float | None) -> None:
        if self.closed:
            self.senders[name] = "closed"
        elif self.has_room():
            self.senders[name] = "accepted"
            self.accept(name, request_id, timeout)
        else:
            self.senders[name] = "waiting"
            self.waiting.append((name, request_id, timeout))
        self.settle()

    def cancel_sender(self, name: str) -> None:
        self.waiting = [w for w in self.waiting if w[0] != name]
        self.senders[name] = "cancelled"

    # -- running -----------------------------------------------------------------------

    def start(self, job: MJob) -> None:
        job.state = "running"
        job.start = self.now
        self.running.append(job)

    def finish(self, job: MJob, state: str) -> None:
        self.running.remove(job)
        job.state = state
        job.end = self.now

    def release(self, name: str, outcome: str) -> None:
        self.jobs[name].release = outcome
        self.settle()

    def settle(self) -> None:
        """Run everything that happens at the current instant, to quiescence."""
        progressed = True
        while progressed:
            progressed = False
            for job in list(self.running):
                if job.release is not None:
                    self.finish(job, "completed" if job.release == "complete" else "failed")
                    progressed = True
            if self.cut:
                continue
            while len(self.running) < self.cap and self.queue:
                self.start(self.queue.pop(0))
                progressed = True
            while self.waiting and self.has_room():
                name, request_id, timeout = self.waiting.pop(0)
                self.senders[name] = "accepted"
                self.accept(name, request_id, timeout)
                progressed = True
        if self.phase == "draining" and self.idle():
            self.end_drain(NONE)

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while True:
            instants = [j.start + j.timeout for j in self.running if j.start is not None]
            if self.phase == "draining" and self.drain_deadline is not None:
                instants.append(self.drain_deadline)
            instants = [t for t in instants if t <= target]
            if not instants:
                break
            self.now = min(instants)
            if self.phase == "draining" and self.drain_deadline == self.now:
                self.deadline_cut()
            else:
                for job in list(self.running):
                    assert job.start is not None
                    if job.start + job.timeout == self.now:
                        self.finish(job, "timed_out")
                self.settle()
        self.now = target

    # -- shutdown ----------------------------------------------------------------------

    def close_intake(self) -> None:
        if self.closed:
            return
        self.closed = True
        for name, _, _ in self.waiting:
            self.senders[name] = "closed"
        self.waiting = []

    def cut_off(self) -> Result:
        """Cancel what runs, drop what waits; return the report it makes."""
        self.close_intake()
        cancelled = [j for j in self.jobs.values() if j.state == "running"]
        dropped = list(self.queue)
        for job in cancelled:
            self.finish(job, "cancelled")
        for job in dropped:
            job.state = "dropped"
        self.queue = []
        self.cut = True
        report: Result = (
            "shutdown",
            tuple((j.name, j.request_id) for j in cancelled),
            tuple((j.name, j.request_id) for j in dropped),
        )
        if cancelled or dropped:
            self.report = report
        return report

    def resolve(self, closer: MCloser, result: frozenset[Result]) -> None:
        closer.result = result
        if closer.kind == "body":
            # The block's implicit aclose(): None means the block exits normally.
            self.body = "done"
            self.body_result = frozenset(("ok",) if r == ("none",) else r for r in result)

    def end_drain(self, primary_result: frozenset[Result]) -> None:
        """The first aclose() finished: it gets primary_result, the waiting ones None."""
        self.phase = "done"
        for closer in self.closers:
            if closer.result is None:
                self.resolve(closer, primary_result if closer.primary else NONE)

    def start_aclose(self, kind: str) -> None:
        closer = MCloser(kind)
        self.closers.append(closer)
        if kind == "body":
            self.body = "exiting"
        if self.phase == "open":
            closer.primary = True
            self.close_intake()
            self.phase = "draining"
            if self.drain_timeout != math.inf:
                self.drain_deadline = self.now + self.drain_timeout
            self.settle()
            if self.phase == "draining" and self.drain_timeout == 0:
                self.deadline_cut()
        elif self.phase == "done":
            # Shutdown already happened: a later call returns None.
            self.resolve(closer, NONE)

    def deadline_cut(self) -> None:
        report = self.cut_off()
        self.end_drain(frozenset({report}))

    def cancel_primary(self) -> None:
        """The task awaiting the first aclose() is cancelled: cut off at once."""
        self.cut_off()
        self.end_drain(frozenset({("cancelled",)}))

    def body_leaves(self, how: Result) -> None:
        """The body raised or was cancelled: no drain, cut off at once."""
        if self.body == "exiting":  # cancelled while awaiting its own aclose (primary)
            self.cut_off()
            self.end_drain(frozenset({how}))
            return
        if self.phase == "open":
            self.cut_off()
            self.phase = "done"
        elif self.phase == "draining":
            # A helper's aclose() is draining. The contract does not say what it
            # returns when the body cuts it short: None, or the report of the cut.
            report = self.cut_off()
            self.end_drain(frozenset({("none",), report}))
        self.body = "done"
        self.body_result = frozenset({how})


# --------------------------------------------------------------------------------------
# The real runtime, in a Trio thread
# --------------------------------------------------------------------------------------


class StepObserver(trio.abc.Instrument):
    """Checks the invariants after every single Trio task step."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.harness.observe()


class LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[int, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.levelno, getattr(record, "job_name", None)))


@attrs.frozen
class Snapshot:
    now: float
    stats: BackgroundStatistics
    accepted: tuple[str, ...]
    started: dict[str, float]
    ended: dict[str, tuple[float, str]]
    finished_hook: dict[str, tuple[str, float]]
    dropped_hook: tuple[str, ...]
    senders: dict[str, str]
    closers: tuple[Result, ...]
    after_close: tuple[BackgroundStatistics, ...]
    body: Result
    body_after: BackgroundStatistics | None
    logs: tuple[tuple[int, object], ...]
    failures: tuple[str, ...]


class Harness:
    """One ``trio.run`` in a thread, holding one runtime, driven step by step."""

    def __init__(self, config: BackgroundTaskConfig) -> None:
        self.config = config
        self.clock = trio.testing.MockClock(autojump_threshold=math.inf)
        self.token: trio.lowlevel.TrioToken | None = None
        self.runtime: BackgroundRuntime | None = None
        self.nursery: trio.Nursery | None = None
        self.stop = trio.Event()
        self.body_go = trio.Event()
        self.body_command = ""
        self.body_exc = BodyError("raised in the body")
        self.body_scope = trio.CancelScope()
        self.body: Result = WAITING
        self.body_after: BackgroundStatistics | None = None
        self.events: dict[str, trio.Event] = {}
        self.outcomes: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.ended: dict[str, tuple[float, str]] = {}
        self.accepted: list[str] = []
        self.finished_hook: dict[str, tuple[str, float]] = {}
        self.dropped_hook: list[str] = []
        self.senders: dict[str, str] = {}
        self.sender_scopes: dict[str, trio.CancelScope] = {}
        self.closers: list[Result] = []
        self.closer_scopes: list[trio.CancelScope] = []
        self.after_close: list[BackgroundStatistics] = []
        self.queue_full = 0
        self.failures: list[str] = []
        self.error: BaseException | None = None
        self.logs = LogCollector()
        self.logger = logging.getLogger("trio_background")
        self.propagate = self.logger.propagate
        self.logger.addHandler(self.logs)
        # The log is checked here; keep thousands of records out of pytest's capture.
        self.logger.propagate = False
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._thread, name="trio-harness", daemon=True)
        self.thread.start()
        if not self.ready.wait(30) or self.error is not None:  # pragma: no cover
            self.close()
            raise RuntimeError(f"trio thread failed to start: {self.error!r}")

    # -- the Trio side ----------------------------------------------------------------

    def _thread(self) -> None:
        try:
            trio.run(self._main, clock=self.clock, instruments=[StepObserver(self)])
        except BaseException as exc:  # pragma: no cover - reported by the next step
            self.error = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self._body)
            self.ready.set()
            await self.stop.wait()
            nursery.cancel_scope.cancel()

    async def _body(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self.body_scope:
            try:
                async with open_background_runtime(self.config, instruments=[self]) as runtime:
                    self.runtime = runtime
                    task_status.started()
                    await self.body_go.wait()
                    if self.body_command == "raise":
                        raise self.body_exc
            except BodyError as exc:
                self.body = ("raised",) if exc is self.body_exc else ("wrong-exception", exc)
            except BackgroundShutdownError as exc:
                self.body = self.shutdown_result(exc)
            else:
                self.body = ("ok",)
            finally:
                if self.runtime is not None:
                    self.body_after = self.runtime.statistics()
        if self.body_scope.cancelled_caught:
            self.body = ("cancelled",)

    def observe(self) -> None:
        """Invariants at every task step (called by the Trio instrument)."""
        runtime = self.runtime
        if runtime is None:
            return
        s = runtime.statistics()
        problems = []
        if not 0 <= s.queued <= s.max_queue_size:
            problems.append("queued out of range")
        if not 0 <= s.running <= s.max_concurrent_tasks:
            problems.append("running out of range")
        if s.queued and s.running != s.max_concurrent_tasks:
            problems.append("a job is queued while a slot is free")
        if s.accepted != len(self.accepted):
            problems.append(f"accepted {s.accepted} != {len(self.accepted)} reported accepted")
        if s.rejected != self.queue_full:
            problems.append(f"rejected {s.rejected} != {self.queue_full} QueueFullErrors")
        if problems and len(self.failures) < 10:
            self.failures.append(f"at t={trio.current_time()}: {problems}: {s}")

    def shutdown_result(self, exc: BackgroundShutdownError) -> Result:
        s = exc.statistics
        if s.queued or s.running:
            self.failures.append(f"BackgroundShutdownError.statistics not final: {s}")
        return (
            "shutdown",
            tuple(meta_key(j) for j in exc.cancelled),
            tuple(meta_key(j) for j in exc.dropped),
        )

    # BackgroundInstrument hooks (record only; checks happen at task-step granularity).
    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.accepted.append(job.name)

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        if job.name in self.finished_hook:
            self.failures.append(f"job_finished twice for {job.name}")
        self.finished_hook[job.name] = (outcome, duration)

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.dropped_hook.append(job.name)

    async def job(self, name: str) -> None:
        self.started[name] = trio.current_time()
        if SUBMITTER.get(None) != name:
            self.failures.append(f"{name} ran in the context of {SUBMITTER.get(None)!r}")
        try:
            await self.events[name].wait()
        except trio.Cancelled:
            self.ended[name] = (trio.current_time(), "cancelled")
            raise
        outcome = self.outcomes[name]
        self.ended[name] = (trio.current_time(), "returned" if outcome == "complete" else "raised")
        if outcome == "fail":
            raise BackgroundJobError(f"{name} failed")
        if outcome == "error":
            raise ValueError(f"{name} failed")

    async def sender(self, name: str, request_id: str | None, limit: float | None) -> None:
        assert self.runtime is not None
        SUBMITTER.set(name)
        self.senders[name] = "waiting"
        with self.sender_scopes[name]:
            try:
                await self.runtime.handle().send(
                    self.job, name, name=name, request_id=request_id, timeout=limit
                )
            except RuntimeClosedError:
                self.senders[name] = "closed"
                return
            self.senders[name] = "accepted"
            return
        self.senders[name] = "cancelled"

    async def closer(self, index: int) -> None:
        assert self.runtime is not None
        scope = self.closer_scopes[index]
        with scope:
            try:
                try:
                    await self.runtime.aclose()
                finally:
                    self.after_close.append(self.runtime.statistics())
            except BackgroundShutdownError as exc:
                self.closers[index] = self.shutdown_result(exc)
            else:
                self.closers[index] = ("none",)
        if scope.cancelled_caught:
            self.closers[index] = ("cancelled",)

    # -- the bridge -------------------------------------------------------------------

    def step(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` inside Trio with the clock's autojump on, then let it settle."""

        async def run() -> T:
            self.clock.autojump_threshold = 0
            try:
                result = await fn()
                await trio.testing.wait_all_tasks_blocked()
                return result
            finally:
                self.clock.autojump_threshold = math.inf

        assert self.token is not None
        if self.error is not None:  # pragma: no cover
            raise RuntimeError("the trio thread died") from self.error
        return trio.from_thread.run(run, trio_token=self.token)

    def sync_step(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.step(run)

    # -- actions ----------------------------------------------------------------------

    def new_job(self, name: str) -> None:
        self.events[name] = trio.Event()
        self.outcomes[name] = "complete"

    def spawn(self, jobs: list[tuple[str, str | None, float | None]]) -> list[str]:
        def one(name: str, request_id: str | None, timeout: float | None) -> str:
            assert self.runtime is not None
            self.new_job(name)
            SUBMITTER.set(name)
            try:
                self.runtime.handle().spawn(
                    self.job, name, name=name, request_id=request_id, timeout=timeout
                )
            except QueueFullError:
                self.queue_full += 1
                return "full"
            except RuntimeClosedError:
                return "closed"
            return "accepted"

        return self.sync_step(lambda: [one(*job) for job in jobs])

    def send(self, name: str, request_id: str | None, timeout: float | None) -> None:
        def act() -> None:
            assert self.nursery is not None
            self.new_job(name)
            self.sender_scopes[name] = trio.CancelScope()
            self.nursery.start_soon(self.sender, name, request_id, timeout)

        self.sync_step(act)

    def cancel_sender(self, name: str) -> None:
        self.sync_step(self.sender_scopes[name].cancel)

    def release(self, name: str, outcome: str) -> None:
        def act() -> None:
            self.outcomes[name] = outcome
            self.events[name].set()

        self.sync_step(act)

    def advance(self, dt: float) -> None:
        async def act() -> None:
            await trio.sleep(dt)

        self.step(act)

    def start_aclose(self) -> None:
        def act() -> None:
            assert self.nursery is not None
            self.closers.append(WAITING)
            self.closer_scopes.append(trio.CancelScope())
            self.nursery.start_soon(self.closer, len(self.closers) - 1)

        self.sync_step(act)

    def cancel_closer(self, index: int) -> None:
        self.sync_step(self.closer_scopes[index].cancel)

    def body_do(self, command: str) -> None:
        def act() -> None:
            if command == "cancel":
                self.body_scope.cancel()
            else:
                self.body_command = command
                self.body_go.set()

        self.sync_step(act)

    def snapshot(self) -> Snapshot:
        def take() -> Snapshot:
            assert self.runtime is not None
            return Snapshot(
                now=trio.current_time(),
                stats=self.runtime.statistics(),
                accepted=tuple(self.accepted),
                started=dict(self.started),
                ended=dict(self.ended),
                finished_hook=dict(self.finished_hook),
                dropped_hook=tuple(self.dropped_hook),
                senders=dict(self.senders),
                closers=tuple(self.closers),
                after_close=tuple(self.after_close),
                body=self.body,
                body_after=self.body_after,
                logs=tuple(self.logs.seen),
                failures=tuple(self.failures),
            )

        return self.sync_step(take)

    def close(self) -> None:
        """Stop the Trio thread (cancelling whatever is left) and restore the logger."""
        try:
            if self.thread.is_alive() and self.token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self.token.run_sync_soon(self.stop.set)
                self.thread.join(30)
            assert not self.thread.is_alive(), "the trio thread did not stop"
        finally:
            self.logger.removeHandler(self.logs)
            self.logger.propagate = self.propagate


# --------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------


class RuntimeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.harness: Harness | None = None
        self.model = Model(BackgroundTaskConfig())
        self.counter = 0
        self.patience = 0
        self.healthy = True

    @property
    def h(self) -> Harness:
        assert self.harness is not None
        return self.harness

    def next_name(self) -> tuple[str, str | None]:
        n = self.counter
        self.counter += 1
        return f"job{n}", (f"req-{n}" if n % 2 == 0 else None)

    @initialize(config=configs, patience=st.integers(0, 20))
    def open_runtime(self, config: BackgroundTaskConfig, patience: int) -> None:
        # Shutdown rules wait for `patience` submissions, so that most programs spend
        # their steps with the runtime open and busy.
        self.patience = patience
        self.model = Model(config)
        self.harness = Harness(config)

    # -- rules -----------------------------------------------------------------------

    def finished(self) -> bool:
        """Shutdown is over and the block is left: submitting only raises, as checked."""
        return self.model.phase == "done" and self.model.body == "done" and self.counter > 0

    @precondition(lambda self: not self.finished())
    @rule(timeouts=st.lists(job_timeouts, min_size=1, max_size=3))
    def spawn(self, timeouts: list[float | None]) -> None:
        # A burst of spawn() calls, in one step (no checkpoint in between).
        self.healthy = False
        jobs = [(*self.next_name(), timeout) for timeout in timeouts]
        expected = [self.model.spawn(*job) for job in jobs]
        assert self.h.spawn(jobs) == expected
        for result in expected:
            event(f"spawn: {result}")

    @precondition(lambda self: not self.finished())
    @rule(timeout=job_timeouts)
    def send(self, timeout: float | None) -> None:
        self.healthy = False
        name, request_id = self.next_name()
        self.model.send(name, request_id, timeout)
        self.h.send(name, request_id, timeout)
        event(f"send: {self.model.senders[name]}")

    @precondition(lambda self: bool(self.model.waiting))
    @rule(data=st.data())
    def cancel_waiting_send(self, data: st.DataObject) -> None:
        self.healthy = False
        name = data.draw(st.sampled_from([w[0] for w in self.model.waiting]), label="sender")
        self.model.cancel_sender(name)
        self.h.cancel_sender(name)

    def releasable(self) -> list[str]:
        return [
            j.name
            for j in self.model.jobs.values()
            if j.state in ("queued", "running") and j.release is None
        ]

    @precondition(lambda self: bool(self.releasable()))
    @rule(data=st.data(), outcome=st.sampled_from(["complete", "complete", "fail", "error"]))
    def release_job(self, data: st.DataObject, outcome: str) -> None:
        self.healthy = False
        # A running job ends now; a queued one will end as soon as it starts.
        name = data.draw(st.sampled_from(self.releasable()), label="job")
        self.model.release(name, "complete" if outcome == "complete" else "failed")
        self.h.release(name, outcome)

    @rule(dt=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]))
    def advance_time(self, dt: float) -> None:
        self.healthy = False
        self.model.advance(dt)
        self.h.advance(dt)

    def shutdown_kinds(self) -> list[str]:
        """The shutdown moves possible now (another aclose() is always possible)."""
        kinds = ["aclose"]
        if self.model.body == "in_block":
            kinds += ["leave_block", "raise_in_body", "cancel_body"]
        elif (
            self.model.body == "exiting"
            and self.model.phase == "draining"
            and any(c.kind == "body" and c.primary for c in self.model.closers)
        ):
            kinds.append("cancel_body")  # the task awaiting the implicit aclose()
        return kinds

    @precondition(lambda self: self.counter >= self.patience)
    @rule(data=st.data())
    def shut_down(self, data: st.DataObject) -> None:
        # One rule for the four ways to begin (or join) shutdown, so that a random
        # program spends most of its steps with the runtime open.
        self.healthy = False
        kind = data.draw(st.sampled_from(self.shutdown_kinds()), label="kind")
        if kind == "aclose":
            # A task calls aclose() (the first call drains; later ones wait or return).
            self.model.start_aclose("helper")
            self.h.start_aclose()
        elif kind == "leave_block":
            # The body ends normally: the block's implicit aclose().
            self.model.start_aclose("body")
            self.h.body_do("exit")
        elif kind == "raise_in_body":
            self.model.body_leaves(("raised",))
            self.h.body_do("raise")
        else:
            # The body (or the block's implicit aclose()) is cancelled from outside.
            self.model.body_leaves(("cancelled",))
            self.h.body_do("cancel")

    @precondition(lambda self: self.model.draining_helper())
    @rule()
    def cancel_aclose(self) -> None:
        # The task awaiting the first aclose() is cancelled.
        self.healthy = False
        primary = self.model.primary()
        assert primary is not None
        index = [c for c in self.model.closers if c.kind == "helper"].index(primary)
        self.model.cancel_primary()
        self.h.cancel_closer(index)

    # -- checks ----------------------------------------------------------------------

    @invariant()
    def runtime_matches_model(self) -> None:
        if self.harness is None:
            return
        self.healthy = False  # stays False if a check fails: teardown then only cleans up
        self.check(self.h.snapshot())
        self.healthy = True

    def check(self, snap: Snapshot) -> None:
        model = self.model
        assert not snap.failures, snap.failures
        assert snap.now == model.now
        expected = model.statistics()
        assert snap.stats == expected, f"\nreal:  {snap.stats}\nmodel: {expected}"
        s = snap.stats
        assert s.queued + s.running + s.completed + s.failed + s.timed_out + s.cancelled + (
            s.dropped
        ) == len(model.jobs)
        assert s.accepted == len(model.jobs)
        assert s.queued <= s.max_queue_size
        assert s.running <= s.max_concurrent_tasks
        assert s.queued == 0 or s.running == s.max_concurrent_tasks
        # Acceptance order, FIFO start, exact start and end instants.
        assert snap.accepted == tuple(model.jobs)
        starts = [snap.started[n] for n in snap.accepted if n in snap.started]
        assert starts == sorted(starts)
        started = [n for n in snap.accepted if n in snap.started]
        assert started == list(snap.accepted[: len(started)])
        assert snap.started == {j.name: j.start for j in model.jobs.values() if j.start is not None}
        how = {
            "completed": "returned",
            "failed": "raised",
            "timed_out": "cancelled",
            "cancelled": "cancelled",
        }
        assert snap.ended == {
            j.name: (j.end, how[j.state]) for j in model.jobs.values() if j.end is not None
        }
        assert snap.finished_hook == {
            j.name: (j.state, j.end - j.start)
            for j in model.jobs.values()
            if j.end is not None and j.start is not None
        }
        assert snap.dropped_hook == tuple(
            j.name for j in model.jobs.values() if j.state == "dropped"
        )
        # What every send(), aclose() and the body returned or raised.
        assert snap.senders == model.senders
        helpers = [c for c in model.closers if c.kind == "helper"]
        assert len(snap.closers) == len(helpers)
        for real, closer in zip(snap.closers, helpers, strict=True):
            if closer.result is None:
                assert real == WAITING
            else:
                assert real in closer.result, (real, closer.result)
        # After aclose() returns or raises, nothing is queued or running.
        for after in snap.after_close:
            assert after.queued == 0, after
            assert after.running == 0, after
        if model.body_result is None:
            assert snap.body == WAITING
        else:
            assert snap.body in model.body_result, (snap.body, model.body_result)
            assert snap.body_after is not None
            assert snap.body_after.queued == 0
            assert snap.body_after.running == 0
        # The log: ERROR per failed job, WARNING per timed-out / cancelled / dropped job.
        level = {
            "failed": logging.ERROR,
            "timed_out": logging.WARNING,
            "cancelled": logging.WARNING,
            "dropped": logging.WARNING,
        }
        assert Counter(snap.logs) == Counter(
            (level[j.state], j.name) for j in model.jobs.values() if j.state in level
        )

    def teardown(self) -> None:
        if self.harness is None:
            return
        try:
            if not self.healthy:
                return
            # Let everything finish: release every job (again as new ones start) and
            # leave the block; then nothing may be queued or running, and every
            # accepted job must have run or been reported.
            for _ in range(1000):
                names = self.releasable()
                if not names:
                    break
                for name in names:
                    self.model.release(name, "complete")
                    self.h.release(name, "complete")
            if self.model.body == "in_block":
                self.model.start_aclose("body")
                self.h.body_do("exit")
            snap = self.h.snapshot()
            self.check(snap)
            for job in self.model.jobs.values():
                event(f"job {job.state}")
            for closer in self.model.closers:
                assert closer.result is not None
                event(f"{closer.kind} aclose: {'/'.join(sorted(str(r[0]) for r in closer.result))}")
            event(f"body: {'/'.join(sorted(str(r[0]) for r in self.model.body_result or ()))}")
            assert self.model.phase == "done"
            assert snap.stats.queued == snap.stats.running == 0
            assert snap.stats.closed
            for job in self.model.jobs.values():
                assert (job.name in snap.started) != (job.state == "dropped"), job
            if self.model.report is not None:
                _, cancelled, dropped = self.model.report
                assert isinstance(cancelled, tuple)
                assert isinstance(dropped, tuple)
                assert [n for n, _ in cancelled] == [
                    j.name for j in self.model.jobs.values() if j.state == "cancelled"
                ]
        finally:
            self.h.close()


def test_runtime_matches_model() -> None:
    chosen = settings(PROFILE) if LONG else settings(PROFILE, max_examples=120)
    run_state_machine_as_test(RuntimeMachine, settings=chosen)
