"""Hypothesis property tests of the contract's invariants, under Trio's MockClock.

Each example is one sync ``@given`` test that calls ``trio.run(...,
clock=MockClock(autojump_threshold=0))`` itself (pytest-trio only wraps async
tests), so the virtual clock jumps to the next deadline whenever every task is
blocked and an example costs milliseconds. Importing hypothesis makes Trio's
scheduler deterministic per example (trio registers its scheduler's random
generator with hypothesis), so failures replay and shrink.

What is generated: a small config (``max_queue_size`` 0..4, ``max_concurrent_tasks``
1..4, a drain timeout, a default job timeout) and 1..3 submitter tasks, each with a
script of jobs (delay before submitting, ``spawn`` or ``send``, duration, failure,
per-job timeout), plus the instant ``aclose()`` is called.

Times live on a grid so that no two events that could race ever share an instant:
submissions, durations and drain timeouts are whole seconds, job timeouts end in
.5, and ``aclose()`` is called at a time ending in .25 (so the drain deadline ends in
.25 too). Every job event is therefore at a multiple of 0.5 and the drain deadline
never is, so the expected outcome of every job (and the exact instant it starts) can
be predicted from the script and the observed acceptance times.

What is checked:

* at every Trio task step (a ``trio.abc.Instrument``), from inside every job and
  around every submission: the caps, work conservation (``queued == 0 or running ==
  max_concurrent_tasks``), the accounting identity against the number of jobs the
  runtime reported accepted, ``rejected`` against our count of ``QueueFullError``;
  and that a task waiting in ``send()`` only waits while the queue is full;
* ``spawn()`` raises ``QueueFullError`` exactly when ``running == max_concurrent_tasks``
  and ``queued == max_queue_size`` (predicted from a snapshot taken right before the
  call), ``RuntimeClosedError`` exactly once shutdown began;
* waiting ``send()`` calls are accepted in the order they began to wait;
* FIFO start: started jobs form a prefix of the acceptance order, their start times
  never decrease, and each starts exactly when FIFO + work conservation say it must
  (``max(accepted_at, earliest slot release)``); with one slot, each job starts exactly
  when the previous one ended (or when it was accepted, if later);
* after ``aclose()`` returns or raises: ``queued == running == 0``, ``accepted`` equals
  our count of successful ``spawn``/``send`` calls, ``rejected`` our count of
  ``QueueFullError``, every accepted job either started or is in ``.dropped``, the jobs
  running at the deadline are exactly ``.cancelled``, both in acceptance order, every
  counter matches the predicted outcome of every job, and ``aclose()`` returned at the
  exact instant the work was done (or at the deadline);
* inside the runtime's own instrument hooks (user code that may read
  ``statistics()``), the same invariants hold too (a separate test).

Example counts are modest in CI (530 examples over four tests, a few seconds); set
``TRIO_BACKGROUND_LONG=1`` to use the "long" hypothesis profile registered here (3000
examples per test). A virtual-time watchdog turns a deadlocked runtime into a failure
instead of a hang.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Iterator

import attrs
import trio
import trio.testing
from helpers import LONG, PROFILE
from hypothesis import given, settings
from hypothesis import strategies as st

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


def examples(ci: int) -> settings:
    """The active profile, with ``ci`` examples in CI (the long profile keeps its own)."""
    if LONG:
        return settings(PROFILE)
    return settings(PROFILE, max_examples=ci)


#: Virtual seconds after which an example counts as hung (a scenario needs < 300).
WATCHDOG = 10_000

#: Set by the submitting task right before each submission; the job must see it.
SUBMITTER: contextvars.ContextVar[str] = contextvars.ContextVar("SUBMITTER")


@attrs.frozen
class Action:
    """One submission in a submitter's script."""

    delay: int  # whole seconds to sleep before submitting
    send: bool  # await handle.send(...) instead of handle.spawn(...)
    duration: int  # whole seconds the job sleeps
    fail: bool  # raise after sleeping
    timeout: float | None  # per-job timeout: None, inf, or k + 0.5


@attrs.frozen
class Scenario:
    config: BackgroundTaskConfig
    scripts: tuple[tuple[Action, ...], ...]
    close_at: float  # k + 0.25


SLOTS = st.integers(1, 4)


def configs(
    max_concurrent_tasks: st.SearchStrategy[int] = SLOTS,
) -> st.SearchStrategy[BackgroundTaskConfig]:
    return st.builds(
        BackgroundTaskConfig,
        max_queue_size=st.integers(0, 4),
        max_concurrent_tasks=max_concurrent_tasks,
        drain_timeout=st.sampled_from([0.0, 1.0, 3.0, math.inf]),
        job_timeout=st.sampled_from([None, 1.5, 3.5]),
    )


actions = st.builds(
    Action,
    delay=st.sampled_from([0, 0, 1, 2]),
    send=st.booleans(),
    duration=st.integers(0, 4),
    fail=st.booleans(),
    timeout=st.sampled_from([None, None, 0.5, 1.5, 2.5, math.inf]),
)


def scenarios(
    config: st.SearchStrategy[BackgroundTaskConfig] | None = None,
    action: st.SearchStrategy[Action] = actions,
) -> st.SearchStrategy[Scenario]:
    return st.builds(
        Scenario,
        config=configs() if config is None else config,
        scripts=st.lists(st.lists(action, max_size=12).map(tuple), min_size=1, max_size=3).map(
            tuple
        ),
        close_at=st.integers(0, 16).map(lambda k: k + 0.25),
    )


class Recorder:
    """Everything observed during one example, and the checks made while it runs.

    It is also the runtime's instrument (acceptance order and hook outcomes) and is
    driven by a `StepObserver` after every Trio task step. Assertion failures raised
    where Trio or the runtime would swallow them (instrument hooks) are kept in
    `failures` and re-raised after the run.
    """

    def __init__(self, config: BackgroundTaskConfig, *, check_in_hooks: bool = False) -> None:
        self.config = config
        self.cap = config.max_concurrent_tasks
        self.qmax = config.max_queue_size
        self.check_in_hooks = check_in_hooks
        self.runtime: BackgroundRuntime | None = None
        self.failures: list[BaseException] = []
        self.plan: dict[str, Action] = {}
        # Acceptance order and instants, as reported by job_accepted.
        self.accepted: list[str] = []
        self.accepted_at: dict[str, float] = {}
        # Body start and end, as seen from inside each job.
        self.started_at: dict[str, float] = {}
        self.ended: dict[str, tuple[float, str]] = {}  # (instant, returned|raised|cancelled)
        # Runtime hooks.
        self.hook_finished: dict[str, tuple[str, float]] = {}
        self.hook_dropped: list[str] = []
        self.hook_rejected = 0
        self.hook_started: list[str] = []
        # Our own counts of what submissions did.
        self.ok_names: list[str] = []
        self.queue_full = 0
        self.closed_errors = 0
        # send() calls made while the queue was full and not accepted yet.
        self.waiting: set[str] = set()
        # Every send() that had to wait, in the order they began waiting.
        self.wait_order: list[str] = []

    # -- observation ---------------------------------------------------------------

    def observe(self, *, accepting: bool = False) -> None:
        """Check the invariants that hold at every instant.

        ``accepting`` is set inside ``job_accepted``, where the job being accepted may
        or may not be counted yet.
        """
        rt = self.runtime
        if rt is None:
            return
        s = rt.statistics()
        assert s.max_concurrent_tasks == self.cap
        assert s.max_queue_size == self.qmax
        assert 0 <= s.queued <= self.qmax, s
        assert 0 <= s.running <= self.cap, s
        assert min(s.completed, s.failed, s.timed_out, s.cancelled, s.dropped) >= 0, s
        # Work conservation: never a queued job while a slot is free.
        assert s.queued == 0 or s.running == self.cap, s
        # Identity: the counters add up to the jobs the runtime said it accepted,
        # which is at least our count of successful calls (a send() that was just
        # accepted returns a step later) and at most that plus the pending sends.
        if accepting:
            assert s.accepted in (len(self.accepted), len(self.accepted) + 1), (s, self.accepted)
        else:
            assert s.accepted == len(self.accepted), (s, self.accepted)
        assert len(self.ok_names) <= s.accepted, s
        assert s.rejected == self.queue_full, (s, self.queue_full)
        # A send() only waits while the queue is full.
        if self.waiting and not s.closed:
            assert s.running == self.cap, (s, self.waiting)
            assert s.queued == self.qmax, (s, self.waiting)

    def guarded(self, fn: Callable[[], None]) -> None:
        """Run a check where an exception would be swallowed; keep it for later."""
        try:
            fn()
        except AssertionError as exc:  # pragma: no cover - only on failure
            self.failures.append(exc)

    def reraise(self) -> None:
        if self.failures:  # pragma: no cover - only on failure
            raise self.failures[0]

    # -- BackgroundInstrument hooks --------------------------------------------------

    def hook_observe(self, *, accepting: bool = False) -> None:
        if self.check_in_hooks:
            self.guarded(functools.partial(self.observe, accepting=accepting))

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.waiting.discard(job.name)
        self.hook_observe(accepting=True)
        self.accepted.append(job.name)
        self.accepted_at[job.name] = trio.current_time()

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        self.hook_rejected += 1

    def job_started(self, job: BackgroundJobMetadata) -> None:
        self.hook_started.append(job.name)
        self.hook_observe()

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.hook_finished[job.name] = (outcome, duration)
        self.hook_observe()

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.hook_dropped.append(job.name)
        self.hook_observe()


class StepObserver(trio.abc.Instrument):
    """Checks the invariants after every single Trio task step."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self.recorder.guarded(self.recorder.observe)


async def job(rec: Recorder, name: str, duration: int, fail: bool) -> None:
    rec.started_at[name] = trio.current_time()
    # Failures are kept for later: raising here would just count the job as failed.
    if SUBMITTER.get(None) != name:  # the submitter's context, captured at submit time
        rec.failures.append(AssertionError(f"{name} ran in the context of {SUBMITTER.get(None)}"))
    rec.guarded(rec.observe)
    try:
        await trio.sleep(duration)
    except trio.Cancelled:
        rec.ended[name] = (trio.current_time(), "cancelled")
        raise
    if fail:
        rec.ended[name] = (trio.current_time(), "raised")
        raise BackgroundJobError(f"{name} failed")
    rec.ended[name] = (trio.current_time(), "returned")


async def submitter(
    rec: Recorder, runtime: BackgroundRuntime, who: int, script: tuple[Action, ...]
) -> None:
    handle = runtime.handle()
    for n, action in enumerate(script):
        await trio.sleep(action.delay)
        name = f"s{who}j{n}"
        rec.plan[name] = action
        SUBMITTER.set(name)
        now = trio.current_time()
        before = runtime.statistics()
        full = before.running == rec.cap and before.queued == rec.qmax
        args = (rec, name, action.duration, action.fail)
        if action.send:
            if full and not before.closed:
                rec.waiting.add(name)
                rec.wait_order.append(name)
            try:
                await handle.send(job, *args, name=name, timeout=action.timeout)
            except RuntimeClosedError:
                rec.waiting.discard(name)
                rec.closed_errors += 1
                assert runtime.statistics().closed
                assert name not in rec.accepted_at
                continue
            assert not before.closed
            assert name in rec.accepted_at
            if not full:
                # Room at call time: accepted at once, without waiting.
                assert rec.accepted_at[name] == now
            assert name not in rec.waiting
        else:
            error: Exception | None = None
            try:
                handle.spawn(job, *args, name=name, timeout=action.timeout)
            except (QueueFullError, RuntimeClosedError) as exc:
                error = exc
            if isinstance(error, QueueFullError):
                assert str(error) == "background task queue is full"
                assert full, before
                assert not before.closed, before
                rec.queue_full += 1
                after = runtime.statistics()
                assert after.rejected == before.rejected + 1
                assert attrs.evolve(after, rejected=before.rejected) == before
                rec.observe()
                continue
            if isinstance(error, RuntimeClosedError):
                assert before.closed
                assert runtime.statistics() == before
                rec.closed_errors += 1
                continue
            assert not before.closed, before
            assert not full, before
            assert rec.accepted_at[name] == now
            after = runtime.statistics()
            if before.running < rec.cap:
                assert after.running == before.running + 1, (before, after)
            else:
                assert after.queued == before.queued + 1, (before, after)
        rec.ok_names.append(name)
        rec.observe()


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence the runtime's logger for one example.

    Failed, timed-out and cut-off jobs are logged (tested elsewhere); formatting
    thousands of tracebacks into pytest's log capture would dominate the run time.
    """
    logger = logging.getLogger("trio_background")
    disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = disabled


def names(jobs: tuple[BackgroundJobMetadata, ...]) -> list[str]:
    return [j.name for j in jobs]


def run_scenario(scenario: Scenario, *, check_in_hooks: bool = False) -> Recorder:
    """Run one scenario to completion and check everything about it."""
    config = scenario.config
    rec = Recorder(config, check_in_hooks=check_in_hooks)
    observer = StepObserver(rec)
    result: dict[str, object] = {}

    async def main() -> None:
        # A deadlocked runtime would leave Trio with nothing to autojump to: fail instead.
        with trio.fail_after(WATCHDOG):
            await scenario_body()

    async def scenario_body() -> None:
        async with trio.open_nursery() as submitters:
            async with open_background_runtime(config, instruments=[rec]) as runtime:
                rec.runtime = runtime
                for who, script in enumerate(scenario.scripts):
                    submitters.start_soon(submitter, rec, runtime, who, script)
                await trio.sleep(scenario.close_at)
                result["close"] = trio.current_time()
                report: BackgroundShutdownError | None = None
                try:
                    await runtime.aclose()
                except BackgroundShutdownError as exc:
                    report = exc
                result["done"] = trio.current_time()
                result["report"] = report
                result["after_close"] = runtime.statistics()
                # A later call returns None.
                await runtime.aclose()
            result["after_exit"] = runtime.statistics()

    with quiet_logs():
        trio.run(
            main,
            clock=trio.testing.MockClock(autojump_threshold=0),
            instruments=[observer],
        )
    rec.reraise()
    assert observer.steps > 0

    t_close = result["close"]
    t_done = result["done"]
    report = result["report"]
    after_close = result["after_close"]
    assert isinstance(t_close, float)
    assert isinstance(t_done, float)
    assert report is None or isinstance(report, BackgroundShutdownError)
    assert isinstance(after_close, BackgroundStatistics)
    assert after_close == result["after_exit"]
    assert rec.runtime is not None
    stats = rec.runtime.statistics()
    assert stats == after_close

    # Accounting after shutdown.
    order = rec.accepted
    assert len(order) == len(set(order))
    assert sorted(order) == sorted(rec.ok_names)
    assert stats.accepted == len(rec.ok_names)
    assert stats.rejected == rec.queue_full == rec.hook_rejected
    assert stats.queued == 0
    assert stats.running == 0
    assert stats.closed
    assert (
        stats.queued
        + stats.running
        + stats.completed
        + stats.failed
        + stats.timed_out
        + stats.cancelled
        + stats.dropped
        == len(rec.ok_names)
    )

    # Waiting send()s are accepted first come, first served; those still waiting at
    # shutdown (the last ones) get RuntimeClosedError.
    admitted = [n for n in order if n in rec.wait_order]
    assert admitted == rec.wait_order[: len(admitted)]

    # FIFO: started jobs are a prefix of the acceptance order, start times never
    # decrease, and each starts exactly when a FIFO, work-conserving runtime must.
    started = [n for n in order if n in rec.started_at]
    assert started == order[: len(started)]
    # job_started fires on each job's first step: every started job once, in start-time
    # order (jobs that start at the same instant may take their first step in any order).
    assert sorted(rec.hook_started, key=order.index) == started
    hook_times = [rec.started_at[n] for n in rec.hook_started]
    assert hook_times == sorted(hook_times)
    starts = [rec.started_at[n] for n in started]
    assert starts == sorted(starts)
    assert set(rec.ended) == set(started), "a job outlived the runtime"
    deadline = t_close + config.drain_timeout
    slots = [-math.inf] * rec.cap
    for n in order:
        predicted = max(rec.accepted_at[n], heapq.heappop(slots))
        if n in rec.started_at:
            assert rec.started_at[n] == predicted, (n, rec.started_at[n], predicted)
            heapq.heappush(slots, rec.ended[n][0])
        else:
            # Never started: it was still waiting for a slot at the drain deadline.
            assert predicted >= deadline, (n, predicted, deadline)
            heapq.heappush(slots, math.inf)

    # Predict each job's outcome from its script, its start and the deadline.
    expected: dict[str, str] = {}
    for n in order:
        action = rec.plan[n]
        if n not in rec.started_at:
            expected[n] = "dropped"
            continue
        start = rec.started_at[n]
        limit = action.timeout if action.timeout is not None else config.job_timeout
        limit = math.inf if limit is None else limit
        natural_end = start + min(action.duration, limit)
        end, how = rec.ended[n]
        if natural_end > deadline:
            expected[n] = "cancelled"
            assert (end, how) == (deadline, "cancelled"), (n, end, how)
        elif limit < action.duration:
            expected[n] = "timed_out"
            assert (end, how) == (natural_end, "cancelled"), (n, end, how)
        else:
            expected[n] = "failed" if action.fail else "completed"
            assert (end, how) == (natural_end, "raised" if action.fail else "returned")
        outcome, duration = rec.hook_finished[n]
        assert outcome == expected[n], (n, outcome, expected[n])
        assert duration == end - start
    assert set(rec.hook_finished) == set(started)

    def count(outcome: str) -> int:
        return sum(1 for v in expected.values() if v == outcome)

    assert stats.completed == count("completed")
    assert stats.failed == count("failed")
    assert stats.timed_out == count("timed_out")
    assert stats.cancelled == count("cancelled")
    assert stats.dropped == count("dropped")

    # Nothing accepted is neither run nor reported, and the report is in acceptance order.
    cancelled = [n for n in order if expected[n] == "cancelled"]
    dropped = [n for n in order if expected[n] == "dropped"]
    assert rec.hook_dropped == dropped
    if cancelled or dropped:
        assert report is not None, "jobs were cut off but aclose() did not raise"
        assert names(report.cancelled) == cancelled
        assert names(report.dropped) == dropped
        assert all(j.request_id is None for j in report.cancelled + report.dropped)
        assert report.statistics == stats
        assert t_done == deadline
    else:
        assert report is None, report
        # Returns at the exact instant the work is done: no polling floor.
        assert t_done == max([t_close] + [end for end, _ in rec.ended.values()])
    return rec


@examples(ci=250)
@given(scenarios())
def test_invariants_hold_for_random_workloads(scenario: Scenario) -> None:
    run_scenario(scenario)


@examples(ci=80)
@given(scenarios(config=configs(max_concurrent_tasks=st.just(1))))
def test_one_slot_runs_jobs_strictly_in_acceptance_order(scenario: Scenario) -> None:
    rec = run_scenario(scenario)
    started = [n for n in rec.accepted if n in rec.started_at]
    for prev, nxt in itertools.pairwise(started):
        # Each job starts when the previous one ends (or when it is accepted, if later).
        assert rec.started_at[nxt] == max(rec.ended[prev][0], rec.accepted_at[nxt])


# Bursts of spawns at the same instant hit the queue-full boundary hardest.
spawn_bursts = st.builds(
    Action,
    delay=st.sampled_from([0, 0, 0, 1]),
    send=st.just(False),
    duration=st.integers(0, 3),
    fail=st.just(False),
    timeout=st.just(None),
)


@examples(ci=120)
@given(scenarios(action=spawn_bursts))
def test_queue_full_error_exactly_when_slots_and_queue_are_full(scenario: Scenario) -> None:
    rec = run_scenario(scenario)
    assert rec.queue_full == rec.hook_rejected


@examples(ci=80)
@given(scenarios())
def test_counters_add_up_inside_instrument_hooks(scenario: Scenario) -> None:
    # The same invariants, also observed synchronously from inside every
    # BackgroundInstrument hook (user code that may read statistics()).
    run_scenario(scenario, check_in_hooks=True)
