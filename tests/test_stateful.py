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
when it returns). Further rules cancel handles (``job.cancel()``) of scheduled, queued,
running and finished jobs; resize both limits (``runtime.resize``), up and down, below
what runs or waits; start tasks that ``await job.wait()`` -- plainly, under a
``move_on_after``, or already cancelled -- and cancel such a waiter. A *burst* rule mixes
spawns, cancels, resizes and releases in one synchronous stretch (no checkpoint in
between), which is the only way a program can see a job that holds a slot but whose
code has not run yet (its status is ``"running"``; cancelled then, its code never runs
and it counts ``cancelled``), or cancel a job whose release has already woken it (it
returned normally first: ``completed``). After every single action of a burst, every
handle's ``status`` and ``attempt``, the acceptance order and the statistics must equal
the model's; after every step, also what each finished ``wait()`` returned or raised,
and when (the very value the job returned, the very exception object its last run
raised, `JobTimeoutError`, `JobCancelledError`, or the waiter's own cancellation, which
leaves the job alone). A shrink may leave more jobs running or holding queue places
than the new limits: the model knows how many may exceed a limit (``run_limit``,
``queue_limit``: those present at the shrink, falling as they drain, never rising) and
the checks hold the runtime to that; once the excess has drained, the plain caps hold
again. At every Trio task step the statuses of the known handles must also add up to
the counters.

Scheduling: delays, retries, keys
---------------------------------
Jobs are spawned and sent with a random *plan*: a delay (none, 0, or a multiple of
0.5 s), a key (``None`` or one of three), and a retry policy (none, or ``Retry`` with
``jitter=False``, 1 to 3 attempts, backoffs and multipliers that keep every backoff a
multiple of 0.5 s, ``on`` either ``Exception``, ``ValueError`` -- which the "error"
release raises and the "fail" release, a `BackgroundJobError`, does not --,
``trio.TooSlowError`` (timeouts only) or both); the configuration may carry a default
policy too. Each run of a job is released on its own (complete, or fail with a chosen
exception), before or after it starts; the harness's job function waits for the release
of the run it is (and checks that ``current_job().attempt`` is that number).

The model keeps, besides the queue and the slots, the scheduled jobs (each with its due
instant: a first run's delay, or a retry's backoff ``min(max_backoff, backoff *
multiplier ** (n - 1))`` after run ``n`` failed), a *ready order* (a counter given out
when a job is accepted without a delay and when a scheduled job becomes due -- jobs due
at one instant in acceptance order, before anything is accepted at that instant), and
the holder of each key (from a job's first start to its final outcome, backoffs
included). Whenever a slot is free the job that takes it is the earliest-ready queued
job whose key is free; a new job starts at once only if a slot is free, it has no
delay, and its key has no holder and no queued job; otherwise it needs a queue place
(first runs, queued or scheduled, hold one; retries hold none and are never refused).
From this the model predicts every run's start and end instant, every handle's status
and attempt, ``scheduled`` and ``retried``, the ``job_started`` / ``job_retrying`` /
``job_finished`` calls of each job with their arguments and instants, and every log
record's exact message (the WARNING of each retry names the attempt, and so does the
one of a job dropped at shutdown while waiting to retry). The drain waits for scheduled
jobs due before its deadline; once only scheduled jobs due after it are left (nothing
running or queued), the model cuts off at once, and ``aclose()`` must say that the drain
was cut short. Shutdown rules meet jobs in every state (scheduled, in backoff, queued
behind a busy key, queued to retry, running), and the teardown of each example leaves
the block as soon as every run is released, so the drain also meets scheduled jobs due
before and after its deadline. The report lists what was cut in acceptance order; the
``job_dropped`` calls of a cut-off are compared as a set (they come in no set order).

Besides agreeing with the model, the runtime is held to the scheduling rules directly,
from what the harness sees: at every task step, no two jobs of a key hold it (running,
or waiting to retry), a slot is never free while a queued job's key is free (work
conservation), and the queue places in use (``queued + scheduled`` minus the jobs
waiting for their second or later run) stay within ``max_queue_size``; when a job's
code starts, no other job of its key has started without reaching its final status;
after every step, the jobs of each key have first started in their ready order.

Ties with the scheduling are deliberate: delays, backoffs, clock steps and job timeouts
are all multiples of 0.5 s, so a job often becomes due at the very instant another
times out, and the ``spawn_later`` rule has a task spawn a job at the very instant the
clock gets to (a rule's own step only runs once that instant has settled, the timer
task included). The model resolves these ties by the rule above: what becomes due at an
instant is ready before what is accepted or admitted at it, and the outcome at the end
of the instant does not depend on the order in which Trio runs the woken tasks. One tie
is a genuine race and is excluded: if a job ends at the instant of such a spawn (a
timeout, or a released job that starts then and returns at once), whether its slot is
free for the spawn depends on which task Trio runs first, so the rule first runs a copy
of the model to that instant, and if anything ends there it spawns once the instant has
settled instead. A spawn refused because intake is closed may see jobs due at that
instant not yet ready (nothing is accepted ahead of them): only its result is checked.

When a job ends at the instant several jobs become due, or lets a waiting ``send()``
into the place it left, every other free slot is filled in the same step; two tests at
the end of this module pin both cases down. (Waiting ``send()`` calls are admitted
strictly in arrival order: one that cannot start, and has no place, holds up those
behind it even while a slot is free. The model does the same.)

How Trio is driven from the (synchronous) state machine
-------------------------------------------------------
Each example runs ``trio.run`` in a background thread (`Harness`). Every rule calls
``trio.from_thread.run(...)`` with the run's ``TrioToken`` to execute one step inside
Trio, and the step ends with ``trio.testing.wait_all_tasks_blocked()``, so when the rule
returns the runtime is quiescent and the model can be compared with it. Time is a
``trio.testing.MockClock`` whose ``autojump_threshold`` is 0 *during* a step (so
"advance 1.5 s" is just ``await trio.sleep(1.5)``, and every job timeout, due instant or
drain deadline in between fires at its exact virtual instant) and ``inf`` *between*
steps, so virtual time cannot jump on its own while the state machine is thinking. This
is deterministic (no wall-clock races: the hypothesis thread blocks while Trio works,
and importing hypothesis makes Trio's scheduler seeded per example), needs no
greenlets, and keeps hypothesis's own stateful machinery (rule selection, shrinking,
the printed reproducer). The alternative -- drawing a list of actions and interpreting
it in one ``trio.run`` -- loses the stateful shrinker and the readable step-by-step
reproducer.

Other ties are excluded by construction so every step has one correct outcome: the
drain timeout is 0, inf, or ends in .25/.75, so the drain deadline never coincides with
a job deadline or a due instant (all on the 0.5 s grid), and a waiter's own time limit
ends in .125/.375/.625/.875, so it never coincides with either.

Example counts: 300 programs of up to 40 steps in CI (about 30 s on two cores); set
``TRIO_BACKGROUND_LONG=1`` to use the "long" hypothesis profile registered in
``helpers.py`` (3000 programs of up to 60 steps) for a long run.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import math
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import attrs
import pytest
import trio
import trio.testing
from helpers import LONG, PROFILE, STATUSES
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
    Retry,
    RuntimeClosedError,
    current_job,
    open_background_runtime,
)

T = TypeVar("T")


#: Set by the task that submits a job, right before submitting; the job must see it.
SUBMITTER: contextvars.ContextVar[str] = contextvars.ContextVar("SUBMITTER")

#: A result of aclose() or of the async-with body, as compared between model and runtime:
#: ("waiting",), ("none",), ("ok",), ("cancelled",), ("raised",) or
#: ("shutdown", cancelled, dropped, head) with tuples of (name, request_id), and head
#: "timed out" (the drain's deadline passed) or "cut short" (only jobs due after it left).
Result = tuple[object, ...]
WAITING: Result = ("waiting",)
NONE: frozenset[Result] = frozenset({("none",)})
HEADS = ("timed out", "cut short")

FINAL = frozenset(STATUSES[3:])
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
#: What a handle shows: (status, attempt).
Status = tuple[str, int]

#: The exception a run raises when released with each failing outcome.
ERRORS: dict[str, type[Exception]] = {"fail": BackgroundJobError, "error": ValueError}
#: The keys jobs may have.
KEYS = ("a", "b", "c")
#: The name of the runtime's timer task (it makes due jobs ready).
TIMER_TASK = "trio_background timers"

#: Retry policies without jitter, every backoff a multiple of 0.5 s.
retries = st.builds(
    Retry,
    attempts=st.sampled_from([1, 2, 3, 3]),
    backoff=st.sampled_from([0.5, 1.0, 1.5]),
    multiplier=st.sampled_from([1.0, 2.0, 3.0]),
    max_backoff=st.sampled_from([60.0, 60.0, 1.0, 2.0]),
    jitter=st.just(False),
    on=st.sampled_from(
        [(Exception,)] * 3 + [(ValueError,), (trio.TooSlowError,), (ValueError, trio.TooSlowError)]
    ),
)

configs = st.builds(
    BackgroundTaskConfig,
    max_queue_size=st.integers(0, 3),
    max_concurrent_tasks=st.integers(1, 3),
    drain_timeout=st.sampled_from([0.0, 0.0, 0.25, 0.25, 1.25, 2.75, math.inf]),
    job_timeout=st.sampled_from([None, 1.0, 2.5]),
    retry=st.one_of(st.none(), st.none(), st.none(), retries),
)
job_timeouts = st.sampled_from([None, None, 0.5, 1.5, 2.5, math.inf])
#: A waiter's own time limit: never on the 0.25 s grid of job and drain deadlines.
wait_limits = st.sampled_from([None, None, 0.375, 1.125, 2.625])


@attrs.frozen
class Plan:
    """How a job is scheduled: ``spawn``'s / ``send``'s delay, key and retry arguments."""

    delay: float | None = None
    key: str | None = None
    retry: Retry | None = None


scheduled_plans = st.builds(
    Plan,
    delay=st.sampled_from([None, None, None, 0.0, 0.5, 1.0, 1.5, 2.5]),
    key=st.sampled_from([None, "a", "a", "b", "c"]),
    retry=st.one_of(st.none(), retries, retries, retries),
)
plans = st.one_of(st.just(Plan()), scheduled_plans, scheduled_plans)


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


def log_message(name: str, request_id: str | None, what: str) -> str:
    """The text of the runtime's log record about a job (see ``_log.emit_job``)."""
    text = f"background job {name!r} {what}"
    return text if request_id is None else f"{text} (request_id={request_id!r})"


def retried_waiting(statuses: dict[str, Status]) -> int:
    """The jobs waiting (scheduled or queued) for their second or later run."""
    return sum(
        status in ("scheduled", "queued") and attempt > 1 for status, attempt in statuses.values()
    )


def places_in_use(s: BackgroundStatistics, statuses: dict[str, Status]) -> int:
    """Queue places in use: jobs queued or scheduled for their first run.

    ``statuses`` must hold every job waiting for a retry (they all have handles: a job
    runs, so fails, only after its ``send()`` has returned).
    """
    return s.queued + s.scheduled - retried_waiting(statuses)


def idle_slot_problems(
    s: BackgroundStatistics,
    statuses: dict[str, Status],
    keys: dict[str, str | None],
    accepted: Iterable[str],
) -> list[str]:
    """Work conservation: with a slot free, the queued jobs (known by handle) whose key is free.

    A key is held by a job that runs, or waits (scheduled or queued) for its second or
    later run; a job without a handle yet (a send() accepted but not returned) may hold
    its key, for all we know here.
    """
    if s.running >= s.max_concurrent_tasks:
        return []
    holders: dict[str, set[str]] = {}
    for name in accepted:
        key = keys[name]
        if key is None:
            continue
        seen = statuses.get(name)
        if (
            seen is None
            or seen[0] == "running"
            or (seen[0] in ("scheduled", "queued") and seen[1] > 1)
        ):
            holders.setdefault(key, set()).add(name)
    problems = []
    for name, (status, _) in statuses.items():
        key = keys[name]
        if status == "queued" and (key is None or not holders.get(key, set()) - {name}):
            problems.append(f"{name} (key {key}) is queued while a slot is free: {s}")
    return problems


# -- the synchronous actions of a burst -------------------------------------------------


@attrs.frozen
class Spawn:
    name: str
    request_id: str | None
    timeout: float | None
    plan: Plan = Plan()


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
    statuses: dict[str, Status]  # every handle's status and attempt, by job name
    stats: BackgroundStatistics
    accepted: tuple[str, ...]  # the jobs accepted so far, in order


@attrs.frozen
class Expect:
    """What the model expects to see right after one action of a burst."""

    view: View
    run_limit: int  # the most jobs that may be running (the cap, or a shrink's excess)
    queue_limit: int  # the most queue places that may be in use


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@attrs.define
class MJob:
    name: str
    request_id: str | None
    timeout: float  # effective time limit (inf: none)
    index: int  # acceptance order
    key: str | None
    retry: Retry | None  # effective policy (its own, or the configuration's)
    # scheduled queued running completed failed timed_out cancelled dropped
    state: str = "queued"
    seq: int = 0  # ready order: given when accepted without a delay, and when due
    due: float | None = None  # while scheduled: when it becomes ready
    attempt: int = 1  # the number of its current (or next) run
    releases: list[str] = attrs.Factory(list)  # how each run ends, as released so far
    ran: bool = False  # the current run's code has begun (a job holding a slot may not have)
    cancel: bool = False  # job.cancel() was called while it held a slot
    released_first: bool = False  # ...after its release had already woken its code
    by_handle: bool = False  # cancelled / dropped through its handle: no log, no report
    cleanup_error: bool = False  # raised after a cancel it never saw: logged at ERROR
    slot_at: float | None = None  # when the current run took a slot
    run_at: float | None = None  # when the current run's task began (job_started)
    starts: list[float] = attrs.Factory(list)  # when each run's code began ...
    ends: list[tuple[float, str]] = attrs.Factory(list)  # ... and ended, and how
    hooks: list[tuple[object, ...]] = attrs.Factory(list)  # started / retrying / finished
    final_at: float | None = None  # when it reached its final status

    @property
    def release(self) -> str | None:
        """How the current (or next) run ends, if released already."""
        return self.releases[self.attempt - 1] if len(self.releases) >= self.attempt else None

    @property
    def retried(self) -> bool:
        """Waiting (scheduled or queued) for its second or later run: it holds no place."""
        return self.attempt > 1 and self.state in ("scheduled", "queued")


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


#: A send() waiting for room: (name, request_id, timeout, plan).
Pending = tuple[str, str | None, float | None, Plan]


class Model:
    """What the contract says the runtime must be doing, in plain Python.

    Actions (`spawn`, `send`, `cancel`, `resize`, `mark_release`, ...) do only what
    happens synchronously, inside the call; `settle` then runs what follows at the same
    instant once tasks get to run (jobs whose code starts, wakes up or unwinds, slots
    passed on), to quiescence; `advance` moves virtual time on, instant by instant (jobs
    becoming due, timing out, the drain's deadline).
    """

    def __init__(self, config: BackgroundTaskConfig) -> None:
        self.cap = config.max_concurrent_tasks
        self.qmax = config.max_queue_size
        #: The most jobs that may be running / places in use now: the caps, or after a
        #: shrink what was there at the shrink, falling as it drains (never rising).
        self.run_limit = self.cap
        self.queue_limit = self.qmax
        self.drain_timeout = config.drain_timeout
        self.job_timeout = config.job_timeout
        self.default_retry = config.retry
        self.now = 0.0
        self.jobs: dict[str, MJob] = {}  # acceptance order
        self.handles: list[str] = []  # the jobs whose handle the program holds
        self.queue: list[MJob] = []  # ready jobs waiting for a slot (or for their key)
        self.scheduled: list[MJob] = []  # jobs waiting to become due
        self.running: list[MJob] = []
        self.holders: dict[str, MJob] = {}  # key -> the job holding it
        self.seq = 0  # the last ready order given out
        self.retried = 0
        self.became_due: list[float] = []  # the instants at which jobs became due
        self.waiting: list[Pending] = []  # blocked send()s
        self.senders: dict[str, str] = {}  # waiting accepted closed cancelled
        self.waiters: list[MWaiter] = []
        self.drop_order: list[str] = []
        self.logs: list[tuple[int, str, str]] = []  # (level, job name, message)
        self.rejected = 0
        self.closed = False
        self.phase = "open"  # open, draining (aclose in progress), done
        self.cut = False
        self.drain_deadline: float | None = None
        #: What the cut-off cancelled and dropped, if it cut anything.
        self.report: tuple[tuple[tuple[str, str | None], ...], ...] | None = None
        self.closers: list[MCloser] = []
        self.body = "in_block"  # in_block, exiting (awaiting its aclose), done
        self.body_result: frozenset[Result] | None = None

    # -- views -------------------------------------------------------------------------

    def statistics(self) -> BackgroundStatistics:
        count = Counter(j.state for j in self.jobs.values())
        return BackgroundStatistics(
            scheduled=len(self.scheduled),
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
            retried=self.retried,
        )

    def statuses(self) -> dict[str, Status]:
        return {name: (self.jobs[name].state, self.jobs[name].attempt) for name in self.handles}

    def expect(self, op: Op) -> Expect:
        """Apply ``op``; what the program must see right after it."""
        result = self.apply(op)
        view = View(result, self.statuses(), self.statistics(), tuple(self.jobs))
        return Expect(view, self.run_limit, self.queue_limit)

    def idle(self) -> bool:
        return not self.queue and not self.running and not self.scheduled

    def places(self) -> int:
        """Queue places in use: first runs, queued or scheduled (retries hold none)."""
        return sum(not j.retried for j in self.queue) + sum(not j.retried for j in self.scheduled)

    def primary(self) -> MCloser | None:
        for closer in self.closers:
            if closer.primary:
                return closer
        return None

    def draining_helper(self) -> bool:
        primary = self.primary()
        return self.phase == "draining" and primary is not None and primary.kind == "helper"

    def log(self, level: int, job: MJob, what: str) -> None:
        self.logs.append((level, job.name, log_message(job.name, job.request_id, what)))

    # -- ready order and keys ------------------------------------------------------------

    def key_free_for(self, job: MJob) -> bool:
        return job.key is None or self.holders.get(job.key, job) is job

    def next_ready(self) -> MJob | None:
        """The queued job that takes the next free slot: the earliest ready, key free."""
        ready = [j for j in self.queue if self.key_free_for(j)]
        return min(ready, key=lambda j: j.seq, default=None)

    def can_start(self, plan: Plan) -> bool:
        """Whether a job submitted now with ``plan`` takes a slot at once."""
        key = plan.key
        return (
            len(self.running) < self.cap
            and not plan.delay
            and self.next_ready() is None
            and (key is None or (key not in self.holders and all(j.key != key for j in self.queue)))
        )

    def ready(self, job: MJob) -> None:
        """``job`` becomes ready: it joins the queue, next in ready order."""
        self.seq += 1
        job.seq = self.seq
        job.state = "queued"
        job.due = None
        self.queue.append(job)

    def schedule(self, job: MJob, due: float) -> None:
        job.state = "scheduled"
        job.due = due
        self.scheduled.append(job)

    def promote(self) -> None:
        """Every scheduled job due now becomes ready, in acceptance order."""
        due = sorted((j for j in self.scheduled if j.due == self.now), key=lambda j: j.index)
        if len(due) > 1:
            event("several jobs due at one instant")
        for job in due:
            self.scheduled.remove(job)
            self.ready(job)
            self.became_due.append(self.now)

    # -- submission --------------------------------------------------------------------

    def effective_timeout(self, timeout: float | None) -> float:
        limit = timeout if timeout is not None else self.job_timeout
        return math.inf if limit is None else limit

    def accept(self, name: str, request_id: str | None, timeout: float | None, plan: Plan) -> None:
        retry = plan.retry if plan.retry is not None else self.default_retry
        timeout_ = self.effective_timeout(timeout)
        job = MJob(name, request_id, timeout_, len(self.jobs), plan.key, retry)
        starts = self.can_start(plan)
        self.jobs[name] = job
        if starts:
            self.seq += 1
            job.seq = self.seq
            self.take_slot(job)
            return
        assert self.places() < self.qmax, "model: a place taken beyond the queue's size"
        if plan.delay:
            self.schedule(job, self.now + plan.delay)
        else:
            if plan.key is not None and plan.key in self.holders:
                event("queued behind a busy key")
            self.ready(job)

    def has_room(self, plan: Plan) -> bool:
        return self.can_start(plan) or self.places() < self.qmax

    def spawn(self, name: str, request_id: str | None, timeout: float | None, plan: Plan) -> str:
        if self.closed:
            return "closed"
        if not self.has_room(plan):
            self.rejected += 1
            return "full"
        self.accept(name, request_id, timeout, plan)
        self.handles.append(name)
        return "accepted"

    def send(self, name: str, request_id: str | None, timeout: float | None, plan: Plan) -> None:
        if self.closed:
            self.senders[name] = "closed"
        elif self.has_room(plan):
            self.senders[name] = "accepted"
            self.accept(name, request_id, timeout, plan)
        else:
            self.senders[name] = "waiting"
            self.waiting.append((name, request_id, timeout, plan))

    def cancel_sender(self, name: str) -> None:
        self.waiting = [w for w in self.waiting if w[0] != name]
        self.senders[name] = "cancelled"

    def admit(self) -> None:
        """Accept the longest-waiting send()."""
        name, request_id, timeout, plan = self.waiting.pop(0)
        self.senders[name] = "accepted"
        self.accept(name, request_id, timeout, plan)

    # -- handles and limits ------------------------------------------------------------

    def apply(self, op: Op) -> str:
        """One synchronous action of a burst; returns what the program sees it return."""
        if isinstance(op, Spawn):
            return self.spawn(op.name, op.request_id, op.timeout, op.plan)
        if isinstance(op, Cancel):
            self.cancel(op.name)
        elif isinstance(op, Resize):
            self.resize(op.slots, op.places)
        else:
            self.mark_release(op.name, op.outcome)
        return "ok"

    def cancel(self, name: str) -> None:
        job = self.jobs[name]
        if job.state in ("queued", "scheduled"):
            # Dropped at once; its place (a first run's) is free at once, and so is its
            # key (a retry's).
            (self.queue if job.state == "queued" else self.scheduled).remove(job)
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
        self.queue_limit = max(self.qmax, self.places())

    def tighten(self) -> None:
        """An excess left by a shrink only drains: the limits follow it down."""
        self.run_limit = max(self.cap, min(self.run_limit, len(self.running)))
        self.queue_limit = max(self.qmax, min(self.queue_limit, self.places()))
        # (So once an excess has drained, the limits are the caps again.)

    def refill(self) -> bool:
        """Start ready jobs on free slots, then admit waiting send()s, in order, while
        the first can start at once or has a place."""
        if self.cut:
            return False
        progressed = False
        while True:
            while len(self.running) < self.cap:
                job = self.next_ready()
                if job is None:
                    break
                self.queue.remove(job)
                self.take_slot(job)
                progressed = True
            placed = False
            while self.waiting:
                plan = self.waiting[0][3]
                if self.can_start(plan):
                    self.admit()
                elif self.places() < self.qmax:
                    self.admit()
                    placed = True
                else:
                    break
                progressed = True
            if not placed:
                break
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
        """``job`` takes a slot (and its key); its code runs once tasks get to run."""
        assert len(self.running) < self.cap, "model: a job started at or above the cap"
        if job.key is not None:
            assert self.holders.get(job.key, job) is job, "model: a key taken twice"
            self.holders[job.key] = job
        job.state = "running"
        job.slot_at = self.now
        job.ran = False
        job.run_at = None
        self.running.append(job)

    def code_ends(self, job: MJob, how: str) -> None:
        job.ends.append((self.now, how))

    def end_run(self, job: MJob, outcome: str, error: type[Exception] | None = None) -> None:
        """The current run ended with ``outcome``: the job ends so, or runs again later."""
        self.running.remove(job)
        self.tighten()
        retry = job.retry
        if (
            outcome in ("failed", "timed_out")
            and retry is not None
            and job.attempt < retry.attempts
        ):
            reason = trio.TooSlowError if outcome == "timed_out" else error
            assert reason is not None
            if issubclass(reason, retry.on):
                self.retry_later(job, outcome == "timed_out")
                return
            event("a run failed with an exception its policy does not retry")
        elif outcome in ("failed", "timed_out") and retry is not None:
            event("the last attempt failed")
        assert job.run_at is not None
        job.hooks.append(("finished", outcome, self.now - job.run_at))
        if outcome == "failed":
            self.log(logging.ERROR, job, "failed")
        elif outcome == "timed_out":
            self.log(logging.WARNING, job, f"timed out after {job.timeout:g} seconds")
        elif outcome == "cancelled" and not job.by_handle:
            self.log(logging.WARNING, job, "cancelled at shutdown")
        if job.cleanup_error:
            self.log(logging.ERROR, job, "raised an error while being cancelled")
        self.reach(job, outcome)

    def retry_later(self, job: MJob, timed_out: bool) -> None:
        retry = job.retry
        assert retry is not None
        run = job.attempt
        delay = min(retry.max_backoff, retry.backoff * retry.multiplier ** (run - 1))
        self.retried += 1
        job.attempt = run + 1
        job.hooks.append(("retrying", "too_slow" if timed_out else "raised", delay, self.now))
        what = f"timed out after {job.timeout:g} seconds" if timed_out else "failed"
        self.log(
            logging.WARNING,
            job,
            f"{what} on attempt {run} of {retry.attempts}; retrying in {delay:.3g} seconds",
        )
        event(f"retry after {'a timeout' if timed_out else 'a failure'}")
        self.schedule(job, self.now + delay)

    def drop(self, job: MJob) -> None:
        self.drop_order.append(job.name)
        if not job.by_handle:
            if job.attempt > 1 and job.retry is not None:
                what = (
                    f"dropped at shutdown while waiting to retry "
                    f"(attempt {job.attempt} of {job.retry.attempts})"
                )
            else:
                what = "dropped at shutdown without starting"
            self.log(logging.WARNING, job, what)
        self.reach(job, "dropped")

    def reach(self, job: MJob, state: str) -> None:
        job.state = state
        job.due = None
        job.final_at = self.now
        if job.key is not None and self.holders.get(job.key) is job:
            del self.holders[job.key]
        for waiter in self.waiters:
            if waiter.job == job.name and waiter.result is None:
                waiter.result = (WAIT_OUTCOME[state], self.now)

    def mark_release(self, name: str, outcome: str) -> None:
        job = self.jobs[name]
        assert len(job.releases) < job.attempt
        job.releases.append(outcome)

    def step_job(self, job: MJob) -> bool:
        """Let the running ``job``'s task run; whether its run ended."""
        if not job.ran:
            job.run_at = self.now
            job.hooks.append(("started", self.now))
            if job.cancel:  # cancelled while it held a slot before its code ran
                job.by_handle = True
                self.end_run(job, "cancelled")  # its code never runs
                return True
            job.ran = True
            job.starts.append(self.now)
        if job.cancel and not job.released_first:
            job.by_handle = True
            self.code_ends(job, "cancelled")
            self.end_run(job, "cancelled")
            return True
        release = job.release
        if release is None:
            return False
        completes = release == "complete"
        self.code_ends(job, "returned" if completes else "raised")
        if job.cancel and not completes:
            # It raised after a cancel it never saw: cancelled; the error is logged.
            job.by_handle = True
            job.cleanup_error = True
            self.end_run(job, "cancelled")
        elif completes:
            self.end_run(job, "completed")
        else:
            self.end_run(job, "failed", ERRORS[release])
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
        if self.phase == "draining":
            if self.idle():
                self.end_drain(NONE)
            elif (
                not self.queue
                and not self.running
                and self.drain_deadline is not None
                and min(j.due for j in self.scheduled if j.due is not None) > self.drain_deadline
            ):
                # Only jobs due after the deadline are left: cut off now, not then.
                event("drain: only jobs due after the deadline left")
                self.deadline_cut(HEADS[self.now < self.drain_deadline])

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while True:
            instants = [
                j.starts[-1] + j.timeout for j in self.running if j.ran and j.timeout != math.inf
            ]
            instants += [j.due for j in self.scheduled if j.due is not None]
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
                self.deadline_cut("timed out")
                continue
            timing_out = [j for j in self.running if j.ran and j.starts[-1] + j.timeout == self.now]
            if timing_out and any(j.due == self.now for j in self.scheduled):
                event("a job becomes due as another times out")
            self.promote()  # (whatever becomes due is ready before what follows)
            for job in timing_out:
                self.code_ends(job, "cancelled")
                self.end_run(job, "timed_out")
            self.settle()
        self.now = target

    # -- shutdown ----------------------------------------------------------------------

    def close_intake(self) -> None:
        if self.closed:
            return
        self.closed = True
        for name, _, _, _ in self.waiting:
            self.senders[name] = "closed"
        self.waiting = []

    def cut_off(self) -> tuple[tuple[tuple[str, str | None], ...], ...]:
        """Cancel what runs, drop what waits; return (cancelled, dropped) as reported."""
        self.close_intake()
        cancelled = [j for j in self.jobs.values() if j.state == "running"]
        dropped = sorted(self.queue + self.scheduled, key=lambda j: j.index)
        for job in dropped:
            if job.state == "scheduled":
                event(
                    "cut-off drops a job waiting to retry"
                    if job.retried
                    else "cut-off drops a scheduled job"
                )
            elif job.retried:
                event("cut-off drops a queued retry")
            elif job.key is not None and job.key in self.holders:
                event("cut-off drops a job queued behind a busy key")
        for job in cancelled:
            assert job.ran, "model: cut off in the middle of a step"
            assert not job.cancel, "model: cut off in the middle of a step"
            self.code_ends(job, "cancelled")
            self.end_run(job, "cancelled")
        self.queue = []
        self.scheduled = []
        self.tighten()
        for job in dropped:
            self.drop(job)
        self.cut = True
        cut = (
            tuple((j.name, j.request_id) for j in cancelled),
            tuple((j.name, j.request_id) for j in dropped),
        )
        if cancelled or dropped:
            self.report = cut
        return cut

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
                self.deadline_cut("timed out")
        elif self.phase == "done":
            # Shutdown already happened: a later call returns None.
            self.resolve(closer, NONE)

    def deadline_cut(self, head: str) -> None:
        cut = self.cut_off()
        self.end_drain(frozenset({("shutdown", *cut, head)}))

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
            cut = self.cut_off()
            self.end_drain(frozenset({("none",)} | {("shutdown", *cut, h) for h in HEADS}))
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
        self.harness.observe(task)


class LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[int, object, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.levelno, getattr(record, "job_name", None), record.getMessage()))


@attrs.frozen
class Snapshot:
    now: float
    stats: BackgroundStatistics
    accepted: tuple[str, ...]
    accepted_at: dict[str, float]
    started: dict[str, tuple[float, ...]]
    first_starts: tuple[str, ...]  # the jobs whose code has begun, in the order it did
    ended: dict[str, tuple[tuple[float, str], ...]]
    hooks: dict[str, tuple[tuple[object, ...], ...]]
    dropped_hook: tuple[str, ...]
    senders: dict[str, str]
    statuses: dict[str, Status]
    waiters: tuple[WaitResult | None, ...]
    closers: tuple[Result, ...]
    after_close: tuple[BackgroundStatistics, ...]
    body: Result
    body_after: BackgroundStatistics | None
    logs: tuple[tuple[int, object, str], ...]
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
        self.plans: dict[str, Plan] = {}
        self.keys: dict[str, str | None] = {}
        #: Per job, one event and one outcome per run, in run order (as released).
        self.run_events: dict[str, list[trio.Event]] = {}
        self.outcomes: dict[str, list[str]] = {}
        self.runs: dict[str, int] = {}  # runs whose code has begun
        self.values: dict[str, Value] = {}
        self.raised: dict[str, Exception] = {}  # what the last run raised
        self.started: dict[str, list[float]] = {}
        self.first_starts: list[str] = []
        self.ended: dict[str, list[tuple[float, str]]] = {}
        self.accepted: list[str] = []
        self.accepted_at: dict[str, float] = {}
        self.hooks: dict[str, list[tuple[object, ...]]] = {}
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
        #: What may be running / hold queue places at the next task step: the caps, or
        #: after a shrink what was there then, following the excess down as it drains.
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

    def statuses(self) -> dict[str, Status]:
        return {name: (job.status, job.attempt) for name, job in self.handles.items()}

    def observe(self, task: trio.lowlevel.Task) -> None:
        """Invariants at every task step (called by the Trio instrument)."""
        runtime = self.runtime
        if runtime is None:
            return
        now = trio.current_time()
        s = runtime.statistics()
        statuses = self.statuses()
        places = places_in_use(s, statuses)
        problems = []
        if not 0 <= places <= self.queue_ceiling:
            problems.append(f"{places} queue places in use, beyond {self.queue_ceiling}")
        if not 0 <= s.running <= self.run_ceiling:
            problems.append(f"running beyond {self.run_ceiling}")
        self.note_excess(s, places)
        idle_slot = idle_slot_problems(s, statuses, self.keys, self.accepted)
        problems += idle_slot
        if s.accepted != len(self.accepted):
            problems.append(f"accepted {s.accepted} != {len(self.accepted)} reported accepted")
        if s.rejected != self.queue_full:
            problems.append(f"rejected {s.rejected} != {self.queue_full} QueueFullErrors")
        # Every job is counted under exactly its status. The jobs without a handle here
        # are those of send() calls accepted but not returned yet: waiting or running.
        known = Counter(status for status, _ in statuses.values())
        unknown = {status: getattr(s, status) - known[status] for status in STATUSES}
        if (
            min(unknown.values()) < 0
            or any(unknown[status] for status in FINAL)
            or sum(unknown.values()) != s.accepted - len(self.handles)
        ):
            problems.append(f"statuses {dict(known)} do not add up to the counters")
        # A key has one holder at most: a job running, or waiting to run again.
        holders = Counter(
            self.keys[name]
            for name, (status, attempt) in statuses.items()
            if self.keys[name] is not None
            and (status == "running" or (status in ("scheduled", "queued") and attempt > 1))
        )
        if holders and max(holders.values()) > 1:
            problems.append(f"a key held twice: {holders}")
        if problems and len(self.failures) < 10:
            self.failures.append(f"at t={now}: {problems}: {s}")

    def note_excess(self, s: BackgroundStatistics, places: int) -> None:
        """The excess of a shrink only drains: the ceilings follow it down to the caps."""
        self.run_ceiling = max(s.max_concurrent_tasks, min(self.run_ceiling, s.running))
        self.queue_ceiling = max(s.max_queue_size, min(self.queue_ceiling, places))

    def shutdown_result(self, exc: BackgroundShutdownError) -> Result:
        s = exc.statistics
        if s.queued or s.running or s.scheduled:
            self.failures.append(f"BackgroundShutdownError.statistics not final: {s}")
        message = str(exc)
        if message.startswith("drain timed out after"):
            head = "timed out"
        elif message.startswith("drain cut short: only jobs due after its"):
            head = "cut short"
        else:
            head = f"unexpected message: {message}"
        return (
            "shutdown",
            tuple(meta_key(j) for j in exc.cancelled),
            tuple(meta_key(j) for j in exc.dropped),
            head,
        )

    # BackgroundInstrument hooks (record only; checks happen at task-step granularity).
    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        now = trio.current_time()
        self.accepted.append(job.name)
        self.accepted_at[job.name] = now

    def job_started(self, job: BackgroundJobMetadata) -> None:
        self.hooks.setdefault(job.name, []).append(("started", trio.current_time()))

    def job_retrying(
        self, job: BackgroundJobMetadata, exception: BaseException, delay: float
    ) -> None:
        now = trio.current_time()
        if isinstance(exception, trio.TooSlowError):
            kind = "too_slow"
        elif exception is self.raised.get(job.name):
            kind = "raised"  # the run's very exception object
        else:
            kind = f"other: {exception!r}"
        self.hooks.setdefault(job.name, []).append(("retrying", kind, delay, now))

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.hooks.setdefault(job.name, []).append(("finished", outcome, duration))

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.dropped_hook.append(job.name)

    def event_for(self, name: str, run: int) -> trio.Event:
        """The event that releases run number ``run`` of job ``name``."""
        events = self.run_events[name]
        while len(events) < run:
            events.append(trio.Event())
        return events[run - 1]

    async def job(self, name: str) -> Value:
        run = self.runs[name] = self.runs.get(name, 0) + 1
        now = trio.current_time()
        if run == 1:
            self.first_starts.append(name)
        self.started.setdefault(name, []).append(now)
        if current_job().attempt != run:
            self.failures.append(f"{name}: run {run} has attempt {current_job().attempt}")
        if SUBMITTER.get(None) != name:
            self.failures.append(f"{name} ran in the context of {SUBMITTER.get(None)!r}")
        key = self.keys[name]
        if key is not None:
            # The key is held from a job's first start to its final outcome.
            for other, other_key in self.keys.items():
                handle = self.handles.get(other)
                if (
                    other != name
                    and other_key == key
                    and self.runs.get(other)
                    and (handle is None or handle.status not in FINAL)
                ):
                    self.failures.append(f"at t={now}: {name} started while {other} holds {key}")
        try:
            await self.event_for(name, run).wait()
        except trio.Cancelled:
            self.ended.setdefault(name, []).append((trio.current_time(), "cancelled"))
            raise
        outcome = self.outcomes[name][run - 1]
        how = "returned" if outcome == "complete" else "raised"
        self.ended.setdefault(name, []).append((trio.current_time(), how))
        if outcome == "complete":
            return self.values[name]
        error = ERRORS[outcome](f"{name} failed on run {run}")
        self.raised[name] = error
        raise error

    async def sender(
        self, name: str, request_id: str | None, limit: float | None, plan: Plan
    ) -> None:
        assert self.runtime is not None
        SUBMITTER.set(name)
        self.senders[name] = "waiting"
        with self.sender_scopes[name]:
            try:
                job = await self.runtime.handle().send(
                    self.job,
                    name,
                    name=name,
                    request_id=request_id,
                    timeout=limit,
                    delay=plan.delay,
                    retry=plan.retry,
                    key=plan.key,
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
                # The last run's own exception object, not a copy or a wrapper.
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

    def new_job(self, name: str, plan: Plan) -> None:
        self.plans[name] = plan
        self.keys[name] = plan.key
        self.run_events[name] = []
        self.outcomes[name] = []
        self.values[name] = Value(name)

    def burst(self, ops: list[Op]) -> list[View]:
        """Do ``ops`` one after the other with no checkpoint in between: one Trio step."""
        return self.sync_step(lambda: [self.apply(op) for op in ops])

    def apply(self, op: Op) -> View:
        runtime = self.runtime
        assert runtime is not None
        result = "ok"
        if isinstance(op, Spawn):
            self.new_job(op.name, op.plan)
            SUBMITTER.set(op.name)
            try:
                job = runtime.handle().spawn(
                    self.job,
                    op.name,
                    name=op.name,
                    request_id=op.request_id,
                    timeout=op.timeout,
                    delay=op.plan.delay,
                    retry=op.plan.retry,
                    key=op.plan.key,
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
            handle = self.handles.get(op.name)
            if handle is None:  # (the model accepted a job the runtime did not)
                result = "no such handle"
            else:
                handle.cancel()
        elif isinstance(op, Resize):
            runtime.resize(max_concurrent_tasks=op.slots, max_queue_size=op.places)
            s = runtime.statistics()
            self.run_ceiling = max(s.max_concurrent_tasks, s.running)
            self.queue_ceiling = max(s.max_queue_size, places_in_use(s, self.statuses()))
        else:
            outcomes = self.outcomes[op.name]
            outcomes.append(op.outcome)
            self.event_for(op.name, len(outcomes)).set()
        return View(result, self.statuses(), runtime.statistics(), tuple(self.accepted))

    def send(self, name: str, request_id: str | None, timeout: float | None, plan: Plan) -> None:
        def act() -> None:
            assert self.nursery is not None
            self.new_job(name, plan)
            self.sender_scopes[name] = trio.CancelScope()
            self.nursery.start_soon(self.sender, name, request_id, timeout, plan)

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

    def spawn_at(self, dt: float, op: Spawn) -> View:
        """A task sleeps ``dt``, then does ``op``: at the instant the clock gets there,
        beside whatever else wakes then (the timer task, jobs starting)."""
        views: list[View] = []

        async def spawner() -> None:
            await trio.sleep(dt)
            views.append(self.apply(op))

        async def act() -> None:
            assert self.nursery is not None
            self.nursery.start_soon(spawner)
            await trio.sleep(dt)

        self.step(act)
        return views[0]

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
                accepted_at=dict(self.accepted_at),
                started={name: tuple(times) for name, times in self.started.items()},
                first_starts=tuple(self.first_starts),
                ended={name: tuple(ends) for name, ends in self.ended.items()},
                hooks={name: tuple(calls) for name, calls in self.hooks.items()},
                dropped_hook=tuple(self.dropped_hook),
                senders=dict(self.senders),
                statuses=self.statuses(),
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
            self.check_limits(
                got.stats, got.statuses, got.accepted, want.run_limit, want.queue_limit
            )
        self.model.settle()

    def draw_spawn(self, timeout: float | None, plan: Plan) -> Spawn:
        name, request_id = self.next_name()
        return Spawn(name, request_id, timeout, plan)

    def cancel_groups(self) -> dict[str, list[str]]:
        """The jobs the program holds a handle of, by what cancel() would meet."""
        groups: dict[str, list[str]] = {}
        for name in self.model.handles:
            job = self.model.jobs[name]
            if job.state == "running":
                kind = "running" if job.ran else "holds a slot, code not run yet"
                if job.ran and job.release is not None:
                    kind = "woken by its release"
            elif job.state == "scheduled":
                kind = "waiting to retry" if job.retried else "scheduled"
            elif job.state == "queued":
                kind = "queued"
                if job.retried:
                    kind = "queued to retry"
                elif not self.model.key_free_for(job):
                    kind = "queued behind a busy key"
            else:
                kind = "finished"
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
            timeout = data.draw(job_timeouts, label="timeout")
            return self.draw_spawn(timeout, data.draw(plans, label="plan"))
        if kind == "cancel":
            return self.draw_cancel(data)
        if kind == "resize":
            return data.draw(resizes, label="resize")
        name = data.draw(st.sampled_from(self.releasable()), label="release")
        outcome = data.draw(st.sampled_from(["complete", "fail", "error"]), label="outcome")
        return Release(name, outcome)

    def note_resize(self, op: Resize) -> None:
        m = self.model
        if op.slots is not None and op.slots < len(m.running):
            event("resize: slots below the jobs running")
        if op.places is not None and op.places < m.places():
            event("resize: queue below the places in use")

    # -- rules -----------------------------------------------------------------------

    def finished(self) -> bool:
        """Shutdown is over and the block is left: submitting only raises, as checked."""
        return self.model.phase == "done" and self.model.body == "done" and self.counter > 0

    @precondition(lambda self: not self.finished())
    @rule(jobs=st.lists(st.tuples(job_timeouts, plans), min_size=1, max_size=3))
    def spawn(self, jobs: list[tuple[float | None, Plan]]) -> None:
        # A burst of spawn() calls, in one step (no checkpoint in between).
        ops: list[Op] = [self.draw_spawn(timeout, plan) for timeout, plan in jobs]
        expected = [self.model.expect(op) for op in ops]
        for want in expected:
            event(f"spawn: {want.view.result}")
        self.run_burst(ops, expected)

    def live_handles(self) -> list[str]:
        return [n for n in self.model.handles if self.model.jobs[n].state not in FINAL]

    @precondition(lambda self: bool(self.live_handles()))
    @rule(data=st.data(), count=st.integers(1, 3))
    def cancel_jobs(self, data: st.DataObject, count: int) -> None:
        # cancel() of held jobs, scheduled, queued, running or finished, in one step.
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

    def may_send(self) -> bool:
        return not self.finished()

    @precondition(lambda self: self.may_send())
    @rule(timeout=job_timeouts, plan=plans)
    def send(self, timeout: float | None, plan: Plan) -> None:
        self.healthy = False
        name, request_id = self.next_name()
        self.model.send(name, request_id, timeout, plan)
        self.h.send(name, request_id, timeout, plan)
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
        """Jobs whose current (or next) run has not been released yet."""
        return [
            j.name
            for j in self.model.jobs.values()
            if j.state not in FINAL and len(j.releases) < j.attempt
        ]

    @precondition(lambda self: bool(self.releasable()))
    @rule(data=st.data(), outcome=st.sampled_from(["complete", "fail", "error"]))
    def release_job(self, data: st.DataObject, outcome: str) -> None:
        self.healthy = False
        # A running job's run ends now; a waiting one's will end as soon as it starts.
        name = data.draw(st.sampled_from(self.releasable()), label="job")
        op = Release(name, outcome)
        self.run_burst([op], [self.model.expect(op)])

    @rule(dt=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]))
    def advance_time(self, dt: float) -> None:
        self.healthy = False
        self.model.advance(dt)
        self.h.advance(dt)

    @precondition(lambda self: not self.finished())
    @rule(dt=st.sampled_from([0.5, 1.0, 1.5, 2.5]), timeout=job_timeouts, plan=plans)
    def spawn_later(self, dt: float, timeout: float | None, plan: Plan) -> None:
        # A task spawns a job once the clock has advanced by dt: at that very instant,
        # scheduled jobs may become due (ready before it, whichever task Trio runs
        # first). If a job ends at that instant too (a timeout, a released job that
        # starts then), who runs first decides whether a slot is free for the spawn: a
        # genuine race, so then the job is spawned once the instant has settled.
        self.healthy = False
        trial = copy.deepcopy(self.model)
        trial.advance(dt)
        at = self.model.now + dt
        racy = any(j.final_at == at or any(t == at for t, _ in j.ends) for j in trial.jobs.values())
        op = self.draw_spawn(timeout, plan)
        if racy:
            self.model.advance(dt)
            self.h.advance(dt)
            self.run_burst([op], [self.model.expect(op)])
            return
        event(f"spawn at an instant{' jobs become due' if at in trial.became_due else ''}")
        pending = {name for name, _, _, _ in self.model.waiting}
        self.model.advance(dt)
        want = self.model.expect(op).view
        got = self.h.spawn_at(dt, op)
        # A send() admitted at that instant may not have returned its handle yet.
        admitted = {name for name in pending if self.model.senders[name] == "accepted"}

        def seen(view: View) -> View:
            statuses = {n: v for n, v in view.statuses.items() if n not in admitted}
            return attrs.evolve(view, statuses=statuses)

        if want.result == "closed":
            # Refused before anything else: the jobs due at that instant may or may not
            # have become ready yet (nothing is accepted ahead of them).
            assert got.result == "closed", f"\nreal:  {got}\nmodel: {want}"
        else:
            assert seen(got) == seen(want), f"\nreal:  {got}\nmodel: {want}"
        self.model.settle()

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
        if self.model.phase == "open":
            states = {j.state if not j.retried else "retry" for j in self.model.jobs.values()}
            for state in sorted(states & {"scheduled", "retry", "queued", "running"}):
                event(f"shutdown begins with a job {state}")
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

    def check_limits(
        self,
        s: BackgroundStatistics,
        statuses: dict[str, Status],
        accepted: Iterable[str],
        run_limit: int,
        queue_limit: int,
    ) -> None:
        """The caps, as a shrink may leave them exceeded (the model knows how far)."""
        places = places_in_use(s, statuses)
        assert 0 <= places <= queue_limit, (s, places, queue_limit)
        assert s.running <= run_limit, (s, run_limit)
        if s.running > s.max_concurrent_tasks:
            event("running above the slots, after a shrink")
        if places > s.max_queue_size:
            event("places above the queue size, after a shrink")
        if s.queued > s.max_queue_size and places <= s.max_queue_size:
            event("queued above the queue size: retries")
        # Work conservation: a job waits while a slot is free only for its key.
        problems = idle_slot_problems(s, statuses, self.h.keys, accepted)
        assert not problems, problems

    def check_key_order(self, snap: Snapshot) -> None:
        """The jobs of each key first started in their ready order (from what was seen)."""
        index = {name: i for i, name in enumerate(snap.accepted)}

        def ready(name: str) -> tuple[float, int, int]:
            # Ready when accepted, or when due (before what is accepted at that instant).
            delay = self.h.plans[name].delay or 0.0
            return (snap.accepted_at[name] + delay, 0 if delay else 1, index[name])

        for key in KEYS:
            firsts = [n for n in snap.first_starts if self.h.keys[n] == key]
            assert [ready(n) for n in firsts] == sorted(ready(n) for n in firsts), (key, firsts)
            for name, (status, attempt) in snap.statuses.items():
                if status == "queued" and attempt == 1 and self.h.keys[name] == key:
                    overtaken = [n for n in firsts if ready(n) > ready(name)]
                    assert not overtaken, f"{overtaken} started before {name}, ready earlier"

    def check(self, snap: Snapshot) -> None:
        model = self.model
        assert not snap.failures, snap.failures
        assert snap.now == model.now
        expected = model.statistics()
        assert snap.stats == expected, f"\nreal:  {snap.stats}\nmodel: {expected}"
        s = snap.stats
        assert s.scheduled + s.queued + s.running + s.completed + s.failed + s.timed_out + (
            s.cancelled + s.dropped
        ) == len(model.jobs)
        assert s.accepted == len(model.jobs)
        self.check_limits(s, snap.statuses, snap.accepted, model.run_limit, model.queue_limit)
        # Every handle's status and attempt, as the model says (and so as the counters).
        assert snap.statuses == model.statuses(), (
            f"\nreal:  {snap.statuses}\nmodel: {model.statuses()}"
        )
        assert Counter(status for status, _ in snap.statuses.values()) <= Counter(
            {status: getattr(s, status) for status in STATUSES}
        )
        # Acceptance order; the jobs of each key in ready order; every run's exact start
        # and end instants (so the ready order and the backoffs); every hook call.
        assert snap.accepted == tuple(model.jobs)
        self.check_key_order(snap)
        want_started = {j.name: tuple(j.starts) for j in model.jobs.values() if j.starts}
        assert snap.started == want_started, f"\nreal:  {snap.started}\nmodel: {want_started}"
        assert snap.ended == {j.name: tuple(j.ends) for j in model.jobs.values() if j.ends}
        want_hooks = {j.name: tuple(j.hooks) for j in model.jobs.values() if j.hooks}
        assert snap.hooks == want_hooks, f"\nreal:  {snap.hooks}\nmodel: {want_hooks}"
        # (A cut-off drops jobs in no particular order; its report is in acceptance order.)
        assert Counter(snap.dropped_hook) == Counter(model.drop_order)
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
        # After aclose() returns or raises, nothing is scheduled, queued or running.
        for after in snap.after_close:
            assert after.scheduled == after.queued == after.running == 0, after
        if model.body_result is None:
            assert snap.body == WAITING
        else:
            assert snap.body in model.body_result, (snap.body, model.body_result)
            assert snap.body_after is not None
            assert snap.body_after.scheduled == 0
            assert snap.body_after.queued == 0
            assert snap.body_after.running == 0
        # The log, message by message: ERROR per failed job, WARNING per timed-out job,
        # per retry (naming the attempt) and per job cancelled or dropped by shutdown (a
        # cancel() the program asked for is no warning), ERROR for an error raised by a
        # job unwinding from cancel().
        assert Counter(snap.logs) == Counter(model.logs), (
            f"\nreal:  {sorted(snap.logs, key=str)}\nmodel: {sorted(model.logs, key=str)}"
        )

    def teardown(self) -> None:
        if self.harness is None:
            return
        try:
            if not self.healthy:
                return
            # Let everything finish: release every run (again as new ones start), leave
            # the block, and let time pass while the drain waits for scheduled jobs (or
            # cuts them off, those due after its deadline); then nothing may be waiting
            # or running, and every accepted job must have run or been reported.
            for _ in range(1000):
                names = self.releasable()
                if names:
                    ops: list[Op] = [Release(name, "complete") for name in names]
                    self.run_burst(ops, [self.model.expect(op) for op in ops])
                elif self.model.body == "in_block":
                    if not self.model.idle():
                        event("the block is left with jobs scheduled")
                    self.model.start_aclose("body")
                    self.h.body_do("exit")
                elif self.model.phase != "done":
                    self.model.advance(0.5)
                    self.h.advance(0.5)
                else:
                    break
                self.check(self.h.snapshot())
            snap = self.h.snapshot()
            self.check(snap)
            for job in self.model.jobs.values():
                event(f"job {job.state}{' by handle' if job.by_handle else ''}")
                if job.attempt > 1:
                    event(f"job {job.state} after {job.attempt} attempts")
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
            assert snap.stats.scheduled == snap.stats.queued == snap.stats.running == 0
            assert snap.stats.closed
            for job in self.model.jobs.values():
                # A job's code ran, or it was dropped, or cancelled before it ran.
                assert bool(snap.started.get(job.name)) == bool(job.starts), job
                assert job.starts or job.state == "dropped" or job.by_handle, job
            if self.model.report is not None:
                # The cut-off reports what it cut, never a job cancelled through its handle.
                cancelled, dropped = self.model.report
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


# --------------------------------------------------------------------------------------
# Jitter, and the two behaviours the machine keeps out
# --------------------------------------------------------------------------------------


def test_jittered_backoffs_lie_between_zero_and_the_backoff() -> None:
    # Jobs that fail every run, with jitter: each retry's delay, as job_retrying gives it
    # and as the next run's start instant shows it, lies in [0, computed backoff].
    retry = Retry(attempts=4, backoff=1.0, multiplier=2.0, max_backoff=3.0, jitter=True)
    bounds = [1.0, 2.0, 3.0]  # after runs 1, 2, 3: min(3, 1 * 2 ** (n - 1))
    retrying: dict[str, list[tuple[float, float]]] = {}  # (instant, delay) per retry
    runs: dict[str, list[float]] = {}

    class Hooks:
        def job_retrying(
            self, job: BackgroundJobMetadata, exception: BaseException, delay: float
        ) -> None:
            retrying.setdefault(job.name, []).append((trio.current_time(), delay))

    async def flaky(name: str) -> None:
        runs.setdefault(name, []).append(trio.current_time())
        await trio.sleep(0.5)
        raise ValueError(name)

    async def main() -> None:
        config = BackgroundTaskConfig(max_concurrent_tasks=100, drain_timeout=math.inf)
        async with open_background_runtime(config, instruments=[Hooks()]) as runtime:
            for i in range(30):
                runtime.handle().spawn(flaky, f"job{i}", name=f"job{i}", retry=retry)
        assert runtime.statistics().failed == 30
        assert runtime.statistics().retried == 90

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    delays = []
    for name, calls in retrying.items():
        assert len(calls) == 3
        assert len(runs[name]) == 4
        for n, ((at, delay), bound) in enumerate(zip(calls, bounds, strict=True)):
            assert 0 <= delay <= bound, (name, n + 1, delay)
            assert at == runs[name][n] + 0.5  # the run failed then ...
            assert runs[name][n + 1] == pytest.approx(at + delay, abs=1e-9)  # ... ran again
            delays.append(delay / bound)
    # Drawn, not fixed: spread over the range.
    assert min(delays) < 0.25
    assert max(delays) > 0.75
    assert len(set(delays)) == len(delays)


class QueuedWhileFree:
    """An instrument that notes every job_finished call that sees a free slot and a
    queued job (no keys here: any queued job could take it)."""

    def __init__(self) -> None:
        self.runtime: BackgroundRuntime | None = None
        self.seen: list[BackgroundStatistics] = []

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        assert self.runtime is not None
        s = self.runtime.statistics()
        if s.queued and s.running < s.max_concurrent_tasks:
            self.seen.append(s)


def test_a_job_ending_as_jobs_become_due_leaves_no_slot_free() -> None:
    # job J times out at t=1, when D1 and D2 become due; two slots. Whichever of J's task
    # and the timer task runs first at t=1, no hook may see D2 queued beside a free slot.
    async def main(hook: QueuedWhileFree) -> None:
        config = BackgroundTaskConfig(max_concurrent_tasks=2, max_queue_size=5)
        async with open_background_runtime(config, instruments=[hook]) as runtime:
            hook.runtime = runtime
            handle = runtime.handle()
            handle.spawn(trio.sleep_forever, name="J", timeout=1)
            handle.spawn(trio.sleep, 1, name="D1", delay=1)
            handle.spawn(trio.sleep, 1, name="D2", delay=1)

    hooks = []
    for _ in range(20):  # Trio orders the tasks woken at one instant at random
        hook = QueuedWhileFree()
        trio.run(main, hook, clock=trio.testing.MockClock(autojump_threshold=0))
        hooks.append(hook)
    assert [hook.seen for hook in hooks] == [[]] * 20


def test_a_waiting_send_that_can_start_on_a_free_slot_is_admitted() -> None:
    admitted: list[str] = []

    async def main() -> None:
        config = BackgroundTaskConfig(max_concurrent_tasks=2, max_queue_size=1)
        async with open_background_runtime(config) as runtime:
            handle = runtime.handle()
            go = {name: trio.Event() for name in ("A", "X", "B", "W1", "W2")}

            async def job(name: str) -> None:
                await go[name].wait()

            handle.spawn(job, "A", name="A", key="k")  # holds k
            handle.spawn(job, "X", name="X")
            handle.spawn(job, "B", name="B", key="k")  # waits for k, in the only place
            sent: list[str] = []

            async def send(name: str, key: str | None) -> None:
                await handle.send(job, name, name=name, key=key)
                sent.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, "W1", "k")  # waits: no place
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(send, "W2", None)  # waits behind it
                await trio.testing.wait_all_tasks_blocked()
                go["X"].set()  # a slot is free; W1 has no place still, W2 is behind it
                await trio.testing.wait_all_tasks_blocked()
                go["A"].set()  # B takes A's slot, W1 B's place: W2 can take the free slot
                await trio.sleep(10)
                admitted.extend(sent)
                for done in go.values():
                    done.set()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sorted(admitted) == ["W1", "W2"]  # (both woken in one step: they resume in any order)
