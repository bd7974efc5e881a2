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

Job handles and live limits
---------------------------
The handle of every accepted job is kept (``spawn``'s return value at once, ``send``'s
when it returns). Further rules cancel handles (``job.cancel()``) of queued, running and
finished jobs; resize both limits (``runtime.resize``), up and down, below what runs or
waits; start tasks that ``await job.wait()`` -- plainly, under a ``move_on_after``, or
already cancelled -- and cancel such a waiter. A *burst* rule mixes spawns, cancels,
resizes and releases in one synchronous stretch (no checkpoint in between), which is the
only way a program can see a job that holds a slot but whose code has not run yet (its
status is ``"running"``; cancelled then, its code never runs and it counts
``cancelled``), or cancel a job whose release has already woken it (it returned
normally first: ``completed``). After every single action of a burst, every handle's
``status`` and the statistics must equal the model's; after every step, also what each
finished ``wait()`` returned or raised, and when (the very value the job returned, the
very exception object it raised, `JobTimeoutError`, `JobCancelledError`, or the waiter's
own cancellation, which leaves the job alone). A shrink may leave more jobs running or
queued than the new limits: the model knows how many may exceed a limit (``run_limit``,
``queue_limit``: those present at the shrink, falling as they drain, never rising) and
the checks hold the runtime to that; once the excess has drained, the plain caps hold
again. At every Trio task step the statuses of the known handles must also add up to
the counters.

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
deadline, and a waiter's own time limit ends in .125/.375/.625/.875, so it never
coincides with either.

Example counts: 300 programs of up to 40 steps in CI (about 25 s); set
``TRIO_BACKGROUND_LONG=1`` to use the "long" hypothesis profile registered in
``helpers.py`` (3000 programs of up to 60 steps) for a long run.
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
    BackgroundJob,
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    JobCancelledError,
    JobTimeoutError,
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

#: Every status a job can have here (no delay or retry: never "scheduled").
STATUSES = ("queued", "running", "completed", "failed", "timed_out", "cancelled", "dropped")
FINAL = frozenset(STATUSES[2:])
#: What ``await job.wait()`` gives for a job that ended in each final status.
WAIT_OUTCOME = {
    "completed": "completed",  # the job's very return value
    "failed": "failed",  # the job's very exception object
    "timed_out": "timed_out",  # JobTimeoutError
    "cancelled": "cancelled",  # JobCancelledError
    "dropped": "cancelled",  # JobCancelledError
}
#: A waiter's result: (what wait() gave, or "gave_up", virtual time it finished).
WaitResult = tuple[str, float]

configs = st.builds(
    BackgroundTaskConfig,
    max_queue_size=st.integers(0, 3),
    max_concurrent_tasks=st.integers(1, 3),
    drain_timeout=st.sampled_from([0.0, 0.0, 0.25, 0.25, 1.25, 2.75, math.inf]),
    job_timeout=st.sampled_from([None, 1.0, 2.5]),
)
job_timeouts = st.sampled_from([None, None, 0.5, 1.5, 2.5, math.inf])
#: A waiter's own time limit: never on the 0.25 s grid of job and drain deadlines.
wait_limits = st.sampled_from([None, None, 0.375, 1.125, 2.625])


class BodyError(Exception):
    """Raised in the body of the ``async with`` block by the shut_down rule."""


class Value:
    """What a job returns: one object per job, so wait() can be checked by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Value({self.name!r})"


def meta_key(job: BackgroundJobMetadata) -> tuple[str, str | None]:
    return (job.name, job.request_id)


# -- the synchronous actions of a burst -------------------------------------------------


@attrs.frozen
class Spawn:
    name: str
    request_id: str | None
    timeout: float | None


@attrs.frozen
class Cancel:
    name: str


@attrs.frozen
class Resize:
    slots: int | None
    places: int | None


@attrs.frozen
class Release:
    name: str
    outcome: str  # "complete", "fail" (BackgroundJobError) or "error" (ValueError)


Op = Spawn | Cancel | Resize | Release


@attrs.frozen
class View:
    """What a program can see right after one action of a burst."""

    result: str  # spawn: accepted / full / closed; the others: ok
    statuses: dict[str, str]  # every handle's status, by job name
    stats: BackgroundStatistics


@attrs.frozen
class Expect:
    """What the model expects to see right after one action of a burst."""

    view: View
    run_limit: int  # the most jobs that may be running (the cap, or a shrink's excess)
    queue_limit: int  # the most jobs that may be queued


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@attrs.define
class MJob:
    name: str
    request_id: str | None
    timeout: float  # effective time limit (inf: none)
    state: str = "queued"  # queued running completed failed timed_out cancelled dropped
    release: str | None = None  # "complete" / "failed": set by the release rule
    ran: bool = False  # its code has begun (a job holding a slot may not have, yet)
    cancel: bool = False  # job.cancel() was called while it held a slot
    released_first: bool = False  # ...after its release had already woken its code
    by_handle: bool = False  # cancelled / dropped through its handle: no log, no report
    cleanup_error: bool = False  # raised after a cancel it never saw: logged at ERROR
    slot_at: float | None = None  # when it took a slot
    start: float | None = None  # when its code began
    end: float | None = None  # when its code ended ...
    how: str | None = None  # ... and how: returned, raised, cancelled
    final_at: float | None = None  # when it reached its final status


@attrs.define
class MCloser:
    kind: str  # "helper" (a task awaiting aclose()) or "body" (the implicit aclose)
    primary: bool = False
    result: frozenset[Result] | None = None  # acceptable results; None while waiting


@attrs.define
class MWaiter:
    job: str
    deadline: float  # its own time limit (inf: none)
    result: WaitResult | None = None


class Model:
    """What the contract says the runtime must be doing, in plain Python.

    Actions (`spawn`, `send`, `cancel`, `resize`, `mark_release`, ...) do only what
    happens synchronously, inside the call; `settle` then runs what follows at the same
    instant once tasks get to run (jobs whose code starts, wakes up or unwinds, slots
    passed on), to quiescence.
    """

    def __init__(self, config: BackgroundTaskConfig) -> None:
        self.cap = config.max_concurrent_tasks
        self.qmax = config.max_queue_size
        #: The most jobs that may be running / queued now: the caps, or after a shrink
        #: the jobs that were there at the shrink, falling as they drain (never rising).
        self.run_limit = self.cap
        self.queue_limit = self.qmax
        self.drain_timeout = config.drain_timeout
        self.job_timeout = config.job_timeout
        self.now = 0.0
        self.jobs: dict[str, MJob] = {}  # acceptance order
        self.handles: list[str] = []  # the jobs whose handle the program holds
        self.queue: list[MJob] = []
        self.running: list[MJob] = []
        self.waiting: list[tuple[str, str | None, float | None]] = []  # blocked send()s
        self.senders: dict[str, str] = {}  # waiting accepted closed cancelled
        self.waiters: list[MWaiter] = []
        self.drop_order: list[str] = []
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

    def statuses(self) -> dict[str, str]:
        return {name: self.jobs[name].state for name in self.handles}

    def expect(self, op: Op) -> Expect:
        """Apply ``op``; what the program must see right after it."""
        result = self.apply(op)
        return Expect(
            View(result, self.statuses(), self.statistics()), self.run_limit, self.queue_limit
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
            self.take_slot(job)
        else:
            assert len(self.queue) < self.qmax, "model: queued beyond the queue's size"
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
        self.handles.append(name)
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

    def cancel_sender(self, name: str) -> None:
        self.waiting = [w for w in self.waiting if w[0] != name]
        self.senders[name] = "cancelled"

    def admit(self) -> None:
        """Accept the longest-waiting send()."""
        name, request_id, timeout = self.waiting.pop(0)
        self.senders[name] = "accepted"
        self.accept(name, request_id, timeout)

    # -- handles and limits ------------------------------------------------------------

    def apply(self, op: Op) -> str:
        """One synchronous action of a burst; returns what the program sees it return."""
        if isinstance(op, Spawn):
            return self.spawn(op.name, op.request_id, op.timeout)
        if isinstance(op, Cancel):
            self.cancel(op.name)
        elif isinstance(op, Resize):
            self.resize(op.slots, op.places)
        else:
            self.mark_release(op.name, "complete" if op.outcome == "complete" else "failed")
        return "ok"

    def cancel(self, name: str) -> None:
        job = self.jobs[name]
        if job.state == "queued":
            # Dropped at once; its place in the queue is free at once.
            self.queue.remove(job)
            self.tighten()
            job.by_handle = True
            self.drop(job)
            self.refill()
        elif job.state == "running" and not job.cancel:
            # Cancelled once it has unwound -- unless its code had already been woken to
            # end by its release, in this same step: then it ends by that.
            assert not self.cut, "model: a job is still running after the cut-off"
            job.cancel = True
            job.released_first = job.ran and job.release is not None
        # A finished job (or one cancelled already) is unaffected.

    def resize(self, slots: int | None, places: int | None) -> None:
        if places is not None:
            self.qmax = places
        if slots is not None:
            self.cap = slots
        self.refill()
        # Shrinking cancels and drops nothing: what exceeds the new limits may stay.
        self.run_limit = max(self.cap, len(self.running))
        self.queue_limit = max(self.qmax, len(self.queue))

    def tighten(self) -> None:
        """An excess left by a shrink only drains: the limits follow it down."""
        self.run_limit = max(self.cap, min(self.run_limit, len(self.running)))
        self.queue_limit = max(self.qmax, min(self.queue_limit, len(self.queue)))
        # (So once an excess has drained, the limits are the caps again.)

    def refill(self) -> bool:
        """Start queued jobs on free slots, then admit waiting send()s into free places."""
        if self.cut:
            return False
        progressed = False
        while len(self.running) < self.cap:
            if self.queue:
                self.take_slot(self.queue.pop(0))
            elif self.waiting:
                self.admit()  # (a queue of size 0: straight to a slot)
            else:
                break
            progressed = True
        while self.waiting and len(self.queue) < self.qmax:
            self.admit()
            progressed = True
        self.tighten()
        return progressed

    # -- waiters -----------------------------------------------------------------------

    def wait(self, name: str, limit: float | None, precancelled: bool) -> None:
        waiter = MWaiter(name, math.inf if limit is None else self.now + limit)
        self.waiters.append(waiter)
        job = self.jobs[name]
        if precancelled:
            waiter.result = ("gave_up", self.now)  # wait() is a checkpoint, always
        elif job.state in FINAL:
            waiter.result = (WAIT_OUTCOME[job.state], self.now)

    def cancel_waiter(self, index: int) -> None:
        waiter = self.waiters[index]
        assert waiter.result is None
        waiter.result = ("gave_up", self.now)  # and the job carries on unaffected

    def pending_waiters(self) -> list[int]:
        return [i for i, w in enumerate(self.waiters) if w.result is None]

    # -- running -----------------------------------------------------------------------

    def take_slot(self, job: MJob) -> None:
        """``job`` takes a slot; its code runs once tasks get to run (`settle`)."""
        assert len(self.running) < self.cap, "model: a job started at or above the cap"
        job.state = "running"
        job.slot_at = self.now
        self.running.append(job)

    def code_ends(self, job: MJob, how: str) -> None:
        job.end = self.now
        job.how = how

    def finish(self, job: MJob, state: str) -> None:
        self.running.remove(job)
        self.tighten()
        self.reach(job, state)

    def drop(self, job: MJob) -> None:
        self.drop_order.append(job.name)
        self.reach(job, "dropped")

    def reach(self, job: MJob, state: str) -> None:
        job.state = state
        job.final_at = self.now
        for waiter in self.waiters:
            if waiter.job == job.name and waiter.result is None:
                waiter.result = (WAIT_OUTCOME[state], self.now)

    def mark_release(self, name: str, outcome: str) -> None:
        self.jobs[name].release = outcome

    def step_job(self, job: MJob) -> bool:
        """Let the running ``job``'s task run; whether it ended."""
        if not job.ran:
            if job.cancel:  # cancelled while it held a slot before its code ran
                job.by_handle = True
                self.finish(job, "cancelled")  # its code never runs
                return True
            job.ran = True
            job.start = self.now
        if job.cancel and not job.released_first:
            job.by_handle = True
            self.code_ends(job, "cancelled")
            self.finish(job, "cancelled")
            return True
        if job.release is None:
            return False
        completes = job.release == "complete"
        self.code_ends(job, "returned" if completes else "raised")
        if job.cancel and not completes:
            # It raised after a cancel it never saw: cancelled; the error is logged.
            job.by_handle = True
            job.cleanup_error = True
            self.finish(job, "cancelled")
        else:
            self.finish(job, "completed" if completes else "failed")
        return True

    def settle(self) -> None:
        """Run everything that happens at the current instant, to quiescence."""
        progressed = True
        while progressed:
            progressed = False
            for job in list(self.running):
                if self.step_job(job):
                    progressed = True
            if self.refill():
                progressed = True
        for name, state in self.senders.items():
            if state == "accepted" and name not in self.handles:
                self.handles.append(name)  # its send() has returned the handle
        if self.phase == "draining" and self.idle():
            self.end_drain(NONE)

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while True:
            instants = [j.start + j.timeout for j in self.running if j.start is not None]
            if self.phase == "draining" and self.drain_deadline is not None:
                instants.append(self.drain_deadline)
            instants += [w.deadline for w in self.waiters if w.result is None]
            instants = [t for t in instants if t <= target]
            if not instants:
                break
            self.now = min(instants)
            for waiter in self.waiters:
                if waiter.result is None and waiter.deadline == self.now:
                    waiter.result = ("gave_up", self.now)
            if self.phase == "draining" and self.drain_deadline == self.now:
                self.deadline_cut()
            else:
                for job in list(self.running):
                    assert job.start is not None
                    if job.start + job.timeout == self.now:
                        self.code_ends(job, "cancelled")
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
            assert job.ran, "model: cut off in the middle of a step"
            assert not job.cancel, "model: cut off in the middle of a step"
            self.code_ends(job, "cancelled")
            self.finish(job, "cancelled")
        self.queue = []
        self.tighten()
        for job in dropped:
            self.drop(job)
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
    statuses: dict[str, str]
    waiters: tuple[WaitResult | None, ...]
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
        self.values: dict[str, Value] = {}
        self.raised: dict[str, Exception] = {}
        self.started: dict[str, float] = {}
        self.ended: dict[str, tuple[float, str]] = {}
        self.accepted: list[str] = []
        self.finished_hook: dict[str, tuple[str, float]] = {}
        self.dropped_hook: list[str] = []
        self.handles: dict[str, BackgroundJob[Value]] = {}
        self.senders: dict[str, str] = {}
        self.sender_scopes: dict[str, trio.CancelScope] = {}
        self.waiters: list[WaitResult | None] = []
        self.waiter_scopes: list[trio.CancelScope] = []
        self.closers: list[Result] = []
        self.closer_scopes: list[trio.CancelScope] = []
        self.after_close: list[BackgroundStatistics] = []
        self.queue_full = 0
        #: What may be running / queued at the next task step: the caps, or after a
        #: shrink what was there then, following the excess down as it drains.
        self.run_ceiling = config.max_concurrent_tasks
        self.queue_ceiling = config.max_queue_size
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
        if not 0 <= s.queued <= self.queue_ceiling:
            problems.append(f"queued beyond {self.queue_ceiling}")
        if not 0 <= s.running <= self.run_ceiling:
            problems.append(f"running beyond {self.run_ceiling}")
        self.note_excess(s)
        if s.queued and s.running < s.max_concurrent_tasks:
            problems.append("a job is queued while a slot is free")
        if s.accepted != len(self.accepted):
            problems.append(f"accepted {s.accepted} != {len(self.accepted)} reported accepted")
        if s.rejected != self.queue_full:
            problems.append(f"rejected {s.rejected} != {self.queue_full} QueueFullErrors")
        # Every job is counted under exactly its status. The jobs without a handle here
        # are those of send() calls accepted but not returned yet: queued or running.
        known = Counter(job.status for job in self.handles.values())
        unknown = {status: getattr(s, status) - known[status] for status in STATUSES}
        if (
            min(unknown.values()) < 0
            or any(unknown[status] for status in FINAL)
            or sum(unknown.values()) != s.accepted - len(self.handles)
        ):
            problems.append(f"statuses {dict(known)} do not add up to the counters")
        if problems and len(self.failures) < 10:
            self.failures.append(f"at t={trio.current_time()}: {problems}: {s}")

    def note_excess(self, s: BackgroundStatistics) -> None:
        """The excess of a shrink only drains: the ceilings follow it down to the caps."""
        self.run_ceiling = max(s.max_concurrent_tasks, min(self.run_ceiling, s.running))
        self.queue_ceiling = max(s.max_queue_size, min(self.queue_ceiling, s.queued))

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

    async def job(self, name: str) -> Value:
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
            error: Exception = BackgroundJobError(f"{name} failed")
        elif outcome == "error":
            error = ValueError(f"{name} failed")
        else:
            return self.values[name]
        self.raised[name] = error
        raise error

    async def sender(self, name: str, request_id: str | None, limit: float | None) -> None:
        assert self.runtime is not None
        SUBMITTER.set(name)
        self.senders[name] = "waiting"
        with self.sender_scopes[name]:
            try:
                job = await self.runtime.handle().send(
                    self.job, name, name=name, request_id=request_id, timeout=limit
                )
            except RuntimeClosedError:
                self.senders[name] = "closed"
                return
            self.handles[name] = job
            self.senders[name] = "accepted"
            return
        self.senders[name] = "cancelled"

    async def waiter(self, index: int, name: str) -> None:
        """``await job.wait()`` in a cancel scope of the waiter's own."""
        job = self.handles[name]
        result = "nothing"
        with self.waiter_scopes[index] as scope:
            try:
                value = await job.wait()
            except JobTimeoutError as exc:
                result = "timed_out" if exc.job == job.metadata else f"timed_out {exc.job}"
            except JobCancelledError as exc:
                result = "cancelled" if exc.job == job.metadata else f"cancelled {exc.job}"
            except Exception as exc:
                # The job's own exception object, not a copy or a wrapper.
                result = "failed" if exc is self.raised.get(name) else f"raised {exc!r}"
            else:
                result = "completed" if value is self.values[name] else f"returned {value!r}"
        if scope.cancelled_caught:
            result = "gave_up"
        self.waiters[index] = (result, trio.current_time())

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
        try:
            return trio.from_thread.run(run, trio_token=self.token)
        except (trio.Cancelled, trio.RunFinishedError) as exc:
            # The run ended under the step (something escaped the runtime): fail as an
            # Exception, which hypothesis shrinks, with what ended it.
            self.thread.join(30)
            raise RuntimeError(f"the trio thread died: {self.error!r}") from (self.error or exc)

    def sync_step(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.step(run)

    # -- actions ----------------------------------------------------------------------

    def new_job(self, name: str) -> None:
        self.events[name] = trio.Event()
        self.outcomes[name] = "complete"
        self.values[name] = Value(name)

    def burst(self, ops: list[Op]) -> list[View]:
        """Do ``ops`` one after the other with no checkpoint in between: one Trio step."""
        return self.sync_step(lambda: [self.apply(op) for op in ops])

    def apply(self, op: Op) -> View:
        runtime = self.runtime
        assert runtime is not None
        result = "ok"
        if isinstance(op, Spawn):
            self.new_job(op.name)
            SUBMITTER.set(op.name)
            try:
                job = runtime.handle().spawn(
                    self.job, op.name, name=op.name, request_id=op.request_id, timeout=op.timeout
                )
            except QueueFullError:
                self.queue_full += 1
                result = "full"
            except RuntimeClosedError:
                result = "closed"
            else:
                self.handles[op.name] = job
                result = "accepted"
        elif isinstance(op, Cancel):
            self.handles[op.name].cancel()
        elif isinstance(op, Resize):
            runtime.resize(max_concurrent_tasks=op.slots, max_queue_size=op.places)
            s = runtime.statistics()
            self.run_ceiling = max(s.max_concurrent_tasks, s.running)
            self.queue_ceiling = max(s.max_queue_size, s.queued)
        else:
            self.outcomes[op.name] = op.outcome
            self.events[op.name].set()
        statuses = {name: job.status for name, job in self.handles.items()}
        return View(result, statuses, runtime.statistics())

    def send(self, name: str, request_id: str | None, timeout: float | None) -> None:
        def act() -> None:
            assert self.nursery is not None
            self.new_job(name)
            self.sender_scopes[name] = trio.CancelScope()
            self.nursery.start_soon(self.sender, name, request_id, timeout)

        self.sync_step(act)

    def cancel_sender(self, name: str) -> None:
        self.sync_step(self.sender_scopes[name].cancel)

    def start_waiter(self, name: str, limit: float | None, precancelled: bool) -> None:
        def act() -> None:
            assert self.nursery is not None
            scope = trio.CancelScope() if limit is None else trio.move_on_after(limit)
            if precancelled:
                scope.cancel()
            self.waiters.append(None)
            self.waiter_scopes.append(scope)
            self.nursery.start_soon(self.waiter, len(self.waiters) - 1, name)

        self.sync_step(act)

    def cancel_waiter(self, index: int) -> None:
        self.sync_step(self.waiter_scopes[index].cancel)

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
                statuses={name: job.status for name, job in self.handles.items()},
                waiters=tuple(self.waiters),
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


#: New limits for resize(): None keeps a limit; small values shrink below what is there.
resizes = st.builds(
    Resize,
    slots=st.one_of(st.none(), st.integers(1, 4)),
    places=st.one_of(st.none(), st.integers(0, 4)),
)


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

    # -- bursts: synchronous actions in one Trio step ----------------------------------

    def run_burst(self, ops: list[Op], expected: list[Expect]) -> None:
        """Do ``ops`` in the runtime; after each, it must look as the model said."""
        self.healthy = False
        real = self.h.burst(ops)
        for op, got, want in zip(ops, real, expected, strict=True):
            assert got == want.view, f"right after {op}:\nreal:  {got}\nmodel: {want.view}"
            self.check_limits(got.stats, want.run_limit, want.queue_limit)
        self.model.settle()

    def draw_spawn(self, timeout: float | None) -> Spawn:
        name, request_id = self.next_name()
        return Spawn(name, request_id, timeout)

    def cancel_groups(self) -> dict[str, list[str]]:
        """The jobs the program holds a handle of, by what cancel() would meet."""
        groups: dict[str, list[str]] = {}
        for name in self.model.handles:
            job = self.model.jobs[name]
            if job.state == "running":
                kind = "running" if job.ran else "holds a slot, code not run yet"
                if job.ran and job.release is not None:
                    kind = "woken by its release"
            else:
                kind = job.state if job.state == "queued" else "finished"
            groups.setdefault(kind, []).append(name)
        return groups

    def draw_cancel(self, data: st.DataObject) -> Cancel:
        groups = self.cancel_groups()
        # Finished jobs are the most common: draw them less often than live ones.
        kinds = [kind for kind in sorted(groups) for _ in range(1 if kind == "finished" else 3)]
        kind = data.draw(st.sampled_from(kinds), label="cancel a job that is")
        event(f"cancel: {kind}")
        return Cancel(data.draw(st.sampled_from(groups[kind]), label="job"))

    def draw_op(self, data: st.DataObject) -> Op:
        kinds = ["spawn", "resize"]
        if self.model.handles:
            kinds += ["cancel", "cancel"]
        if self.releasable():
            kinds.append("release")
        kind = data.draw(st.sampled_from(kinds), label="action")
        if kind == "spawn":
            return self.draw_spawn(data.draw(job_timeouts, label="timeout"))
        if kind == "cancel":
            return self.draw_cancel(data)
        if kind == "resize":
            return data.draw(resizes, label="resize")
        name = data.draw(st.sampled_from(self.releasable()), label="release")
        return Release(name, data.draw(st.sampled_from(["complete", "fail"]), label="outcome"))

    def note_resize(self, op: Resize) -> None:
        m = self.model
        if op.slots is not None and op.slots < len(m.running):
            event("resize: slots below the jobs running")
        if op.places is not None and op.places < len(m.queue):
            event("resize: queue below the jobs queued")

    # -- rules -----------------------------------------------------------------------

    def finished(self) -> bool:
        """Shutdown is over and the block is left: submitting only raises, as checked."""
        return self.model.phase == "done" and self.model.body == "done" and self.counter > 0

    @precondition(lambda self: not self.finished())
    @rule(timeouts=st.lists(job_timeouts, min_size=1, max_size=3))
    def spawn(self, timeouts: list[float | None]) -> None:
        # A burst of spawn() calls, in one step (no checkpoint in between).
        ops: list[Op] = [self.draw_spawn(timeout) for timeout in timeouts]
        expected = [self.model.expect(op) for op in ops]
        for want in expected:
            event(f"spawn: {want.view.result}")
        self.run_burst(ops, expected)

    def live_handles(self) -> list[str]:
        return [n for n in self.model.handles if self.model.jobs[n].state not in FINAL]

    @precondition(lambda self: bool(self.live_handles()))
    @rule(data=st.data(), count=st.integers(1, 3))
    def cancel_jobs(self, data: st.DataObject, count: int) -> None:
        # cancel() of held jobs, queued, running or finished, in one step.
        ops: list[Op] = []
        expected = []
        for _ in range(count):
            op = self.draw_cancel(data)
            ops.append(op)
            expected.append(self.model.expect(op))
        self.run_burst(ops, expected)

    @rule(op=resizes)
    def resize(self, op: Resize) -> None:
        self.note_resize(op)
        self.run_burst([op], [self.model.expect(op)])

    @rule(data=st.data(), size=st.integers(2, 6))
    def burst(self, data: st.DataObject, size: int) -> None:
        # Spawns, cancels, resizes and releases with no checkpoint in between: jobs that
        # hold a slot before their code ran, jobs woken by a release, then cancelled.
        ops: list[Op] = []
        expected = []
        for _ in range(size):
            op = self.draw_op(data)
            if isinstance(op, Resize):
                self.note_resize(op)
            ops.append(op)
            expected.append(self.model.expect(op))
        self.run_burst(ops, expected)

    @precondition(lambda self: not self.finished())
    @rule(timeout=job_timeouts)
    def send(self, timeout: float | None) -> None:
        self.healthy = False
        name, request_id = self.next_name()
        self.model.send(name, request_id, timeout)
        self.h.send(name, request_id, timeout)
        self.model.settle()
        event(f"send: {self.model.senders[name]}")

    @precondition(lambda self: bool(self.model.waiting))
    @rule(data=st.data())
    def cancel_waiting_send(self, data: st.DataObject) -> None:
        self.healthy = False
        name = data.draw(st.sampled_from([w[0] for w in self.model.waiting]), label="sender")
        self.model.cancel_sender(name)
        self.h.cancel_sender(name)
        self.model.settle()

    @precondition(lambda self: bool(self.model.handles))
    @rule(data=st.data(), limit=wait_limits, precancelled=st.sampled_from([False] * 3 + [True]))
    def wait_for_job(self, data: st.DataObject, limit: float | None, precancelled: bool) -> None:
        # A task awaits job.wait(), in a cancel scope of its own (with a time limit, or
        # cancelled before it waits: wait() is a checkpoint even for a finished job).
        self.healthy = False
        live = self.live_handles()
        pool = self.model.handles
        if live:
            unfinished: bool = data.draw(st.booleans(), label="a job not finished yet")
            pool = live if unfinished else pool
        name = data.draw(st.sampled_from(pool), label="job")
        event(f"wait for a job that is {self.model.jobs[name].state}")
        self.model.wait(name, limit, precancelled)
        self.h.start_waiter(name, limit, precancelled)

    @precondition(lambda self: bool(self.model.pending_waiters()))
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        # The waiting task is cancelled: its wait() ends; the job must not notice.
        self.healthy = False
        index = data.draw(st.sampled_from(self.model.pending_waiters()), label="waiter")
        self.model.cancel_waiter(index)
        self.h.cancel_waiter(index)

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
        op = Release(name, outcome)
        self.run_burst([op], [self.model.expect(op)])

    @rule(dt=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]))
    def advance_time(self, dt: float) -> None:
        self.healthy = False
        self.model.advance(dt)
        self.h.advance(dt)

    def shutdown_kinds(self) -> list[str]:
        """The shutdown moves possible now (none before `patience` submissions)."""
        if self.counter < self.patience:
            return []
        # Another aclose() is always possible; once shutdown is over, a few are enough.
        helpers = sum(c.kind == "helper" for c in self.model.closers)
        kinds = ["aclose"] if self.model.phase != "done" or helpers < 3 else []
        if self.model.body == "in_block":
            kinds += ["leave_block", "raise_in_body", "cancel_body"]
        elif (
            self.model.body == "exiting"
            and self.model.phase == "draining"
            and any(c.kind == "body" and c.primary for c in self.model.closers)
        ):
            kinds.append("cancel_body")  # the task awaiting the implicit aclose()
        return kinds

    @precondition(lambda self: bool(self.shutdown_kinds()))
    @rule(data=st.data())
    def shut_down(self, data: st.DataObject) -> None:
        # One rule for the four ways to begin (or join) shutdown, so that a random
        # program spends most of its steps with the runtime open.
        self.begin_shutdown(data)

    @precondition(
        lambda self: (
            self.model.phase == "open" and not self.model.idle() and bool(self.shutdown_kinds())
        )
    )
    @rule(data=st.data())
    def shut_down_while_busy(self, data: st.DataObject) -> None:
        # The same, drawn twice as often while there is work to drain or cut off, and
        # jobs cancelled through their handles to keep out of the report.
        self.begin_shutdown(data)

    def begin_shutdown(self, data: st.DataObject) -> None:
        self.healthy = False
        kind = data.draw(st.sampled_from(self.shutdown_kinds()), label="kind")
        event(f"shut down: {kind}, {'idle' if self.model.idle() else 'busy'}")
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

    def check_limits(self, s: BackgroundStatistics, run_limit: int, queue_limit: int) -> None:
        """The caps, as a shrink may leave them exceeded (the model knows how far)."""
        assert s.queued <= queue_limit, (s, queue_limit)
        assert s.running <= run_limit, (s, run_limit)
        if s.running > s.max_concurrent_tasks:
            event("running above the slots, after a shrink")
        if s.queued > s.max_queue_size:
            event("queued above the queue size, after a shrink")
        # Work conservation: a job waits only while every slot is busy.
        assert s.queued == 0 or s.running >= s.max_concurrent_tasks, s

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
        self.check_limits(s, model.run_limit, model.queue_limit)
        # Every handle's status, as the model says (and so as the counters say).
        assert snap.statuses == model.statuses(), (
            f"\nreal:  {snap.statuses}\nmodel: {model.statuses()}"
        )
        assert Counter(snap.statuses.values()) <= Counter(
            {status: getattr(s, status) for status in STATUSES}
        )
        # Acceptance order; FIFO start among the jobs not cancelled before their code
        # ran; exact start and end instants.
        assert snap.accepted == tuple(model.jobs)
        skipped = {j.name for j in model.jobs.values() if j.by_handle and not j.ran}
        eligible = [n for n in snap.accepted if n not in skipped]
        started = [n for n in eligible if n in snap.started]
        assert started == eligible[: len(started)]
        starts = [snap.started[n] for n in started]
        assert starts == sorted(starts)
        assert snap.started == {j.name: j.start for j in model.jobs.values() if j.start is not None}
        assert snap.ended == {
            j.name: (j.end, j.how) for j in model.jobs.values() if j.end is not None
        }
        assert snap.finished_hook == {
            j.name: (j.state, j.final_at - j.slot_at)
            for j in model.jobs.values()
            if j.final_at is not None and j.slot_at is not None
        }
        assert snap.dropped_hook == tuple(model.drop_order)
        # What every wait() returned or raised, and when.
        assert snap.waiters == tuple(w.result for w in model.waiters), (
            f"\nreal:  {snap.waiters}\nmodel: {[w.result for w in model.waiters]}"
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
        # The log: ERROR per failed job, WARNING per timed-out job and per job cancelled
        # or dropped by shutdown (a cancel() the program asked for is no warning), ERROR
        # for an error raised by a job unwinding from cancel().
        logs: Counter[tuple[int, object]] = Counter()
        for j in model.jobs.values():
            if j.state == "failed":
                logs[(logging.ERROR, j.name)] += 1
            elif j.state == "timed_out" or (
                j.state in ("cancelled", "dropped") and not j.by_handle
            ):
                logs[(logging.WARNING, j.name)] += 1
            if j.cleanup_error:
                logs[(logging.ERROR, j.name)] += 1
        assert Counter(snap.logs) == logs

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
                ops: list[Op] = [Release(name, "complete") for name in names]
                self.run_burst(ops, [self.model.expect(op) for op in ops])
            if self.model.body == "in_block":
                self.model.start_aclose("body")
                self.h.body_do("exit")
            snap = self.h.snapshot()
            self.check(snap)
            for job in self.model.jobs.values():
                event(f"job {job.state}{' by handle' if job.by_handle else ''}")
                if job.released_first:
                    event(f"cancel after its release woke it: {job.state}")
                if job.cancel and not job.ran:
                    event("cancelled holding a slot, its code never ran")
            for closer in self.model.closers:
                assert closer.result is not None
                event(f"{closer.kind} aclose: {'/'.join(sorted(str(r[0]) for r in closer.result))}")
            event(f"body: {'/'.join(sorted(str(r[0]) for r in self.model.body_result or ()))}")
            for waiter in self.model.waiters:
                assert waiter.result is not None  # every job ended: every wait() returned
                event(f"wait: {waiter.result[0]}")
            assert self.model.phase == "done"
            assert snap.stats.queued == snap.stats.running == 0
            assert snap.stats.closed
            for job in self.model.jobs.values():
                # A job's code ran, or it was dropped, or cancelled before it ran.
                assert (job.name in snap.started) == job.ran, job
                assert job.ran or job.state == "dropped" or job.by_handle, job
            if self.model.report is not None:
                # The cut-off reports what it cut, never a job cancelled through its handle.
                _, cancelled, dropped = self.model.report
                assert isinstance(cancelled, tuple)
                assert isinstance(dropped, tuple)
                assert [n for n, _ in cancelled] == [
                    j.name
                    for j in self.model.jobs.values()
                    if j.state == "cancelled" and not j.by_handle
                ]
                assert [n for n, _ in dropped] == [
                    j.name
                    for j in self.model.jobs.values()
                    if j.state == "dropped" and not j.by_handle
                ]
                raised = any(
                    result[0] == "shutdown"
                    for closer in self.model.closers
                    for result in closer.result or ()
                )
                if raised and any(j.by_handle for j in self.model.jobs.values()):
                    event("BackgroundShutdownError, with jobs cancelled by handle before")
        finally:
            self.h.close()


def test_runtime_matches_model() -> None:
    chosen = (
        settings(PROFILE) if LONG else settings(PROFILE, max_examples=300, stateful_step_count=40)
    )
    run_state_machine_as_test(RuntimeMachine, settings=chosen)
