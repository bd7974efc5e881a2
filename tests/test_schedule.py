"""Scheduling: delays, retries with backoff, per-key ordering."""

from __future__ import annotations

import contextlib
import logging
import math
import random
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from helpers import (
    Recorder,
    Tracker,
    all_counts,
    check_invariants,
    expected,
    messages,
    random_waits,
)

from trio_background import (
    BackgroundJob,
    BackgroundJobMetadata,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    JobCancelledError,
    QueueFullError,
    Retry,
    RuntimeClosedError,
    current_job,
    open_background_runtime,
)

EXPECTED = ("scheduled", "retried")


def config(**kwargs: Any) -> BackgroundTaskConfig:
    return BackgroundTaskConfig(**{"drain_timeout": 600.0, **kwargs})


def stats_of(runtime: Any) -> dict[str, int]:
    s = runtime.statistics()
    check_invariants(s)
    return {**all_counts(s), "scheduled": s.scheduled, "retried": s.retried}


def counted(**nonzero: int) -> dict[str, int]:
    scheduled = nonzero.pop("scheduled", 0)
    retried = nonzero.pop("retried", 0)
    return {**expected(**nonzero), "scheduled": scheduled, "retried": retried}


class Log:
    """Start and end instants of jobs, by name."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []

    async def job(self, name: str, seconds: float = 1.0) -> str:
        self.events.append((trio.current_time(), "start", name))
        await trio.sleep(seconds)
        self.events.append((trio.current_time(), "end", name))
        return name

    def starts(self) -> list[tuple[float, str]]:
        return [(t, name) for t, what, name in self.events if what == "start"]


# -- delay ----------------------------------------------------------------------------------


async def test_a_delayed_job_is_scheduled_holds_a_place_and_starts_when_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with open_background_runtime(config(max_concurrent_tasks=2, max_queue_size=2)) as runtime:
        handle = runtime.handle()
        t0 = trio.current_time()
        later = handle.spawn(log.job, "later", delay=5)
        assert later.status == "scheduled"
        assert stats_of(runtime) == counted(scheduled=1)
        soon = handle.spawn(log.job, "soon", 10, delay=0)  # 0: no delay
        assert soon.status == "running"
        handle.spawn(log.job, "also", delay=1)  # both places taken now (not the slot)
        with pytest.raises(QueueFullError):
            handle.spawn(log.job, "refused", delay=2)
        assert stats_of(runtime) == counted(scheduled=2, running=1, rejected=1)
        await runtime.wait_idle()
    assert log.starts() == [(t0, "soon"), (t0 + 1, "also"), (t0 + 5, "later")]
    assert await later.wait() == "later"


async def test_a_due_job_becomes_ready_before_a_job_accepted_at_the_same_instant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with open_background_runtime(config(max_concurrent_tasks=1)) as runtime:
        handle = runtime.handle()
        handle.spawn(log.job, "busy", 5)
        handle.spawn(log.job, "due", delay=3)
        await trio.sleep(3)  # "due" is due now, while the slot is busy
        handle.spawn(log.job, "new")  # accepted at the same instant
    assert [name for _, name in log.starts()] == ["busy", "due", "new"]


@pytest.mark.parametrize(
    ("delay", "error", "message"),
    [
        (-1, ValueError, "delay must be >= 0"),
        (float("nan"), ValueError, "delay must not be NaN"),
        (float("inf"), ValueError, "delay must be finite"),
        ("1", TypeError, "delay must be a number or None, not str"),
        (True, TypeError, "delay must be a number or None, not bool"),
    ],
)
async def test_bad_delays_are_refused_and_nothing_is_counted(
    delay: object, error: type[Exception], message: str
) -> None:
    async with open_background_runtime(config()) as runtime:
        with pytest.raises(error, match=message):
            runtime.handle().spawn(trio.sleep, 0, delay=delay)  # type: ignore[arg-type]
        assert stats_of(runtime) == counted()


async def test_bad_retry_and_key_types_are_refused() -> None:
    async with open_background_runtime(config()) as runtime:
        handle = runtime.handle()
        with pytest.raises(TypeError, match="retry must be a Retry or None, not int"):
            handle.spawn(trio.sleep, 0, retry=3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="key must be a str or None, not int"):
            handle.spawn(trio.sleep, 0, key=42)  # type: ignore[arg-type]
        assert stats_of(runtime) == counted()


async def test_cancelling_a_scheduled_job_drops_it_and_frees_its_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_background_runtime(config(max_queue_size=1)) as runtime:
        handle = runtime.handle()
        job = handle.spawn(trio.sleep, 1, delay=10)
        with pytest.raises(QueueFullError):
            handle.spawn(trio.sleep, 1, delay=10)
        job.cancel()
        assert job.status == "dropped"
        handle.spawn(trio.sleep, 1, delay=10)
        with pytest.raises(JobCancelledError):
            await job.wait()
    assert stats_of(runtime) == counted(completed=1, dropped=1, rejected=1)


# -- keys -----------------------------------------------------------------------------------


async def test_jobs_of_one_key_never_overlap_and_start_in_order_others_run_freely(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with open_background_runtime(config(max_concurrent_tasks=3)) as runtime:
        handle = runtime.handle()
        jobs = [
            handle.spawn(log.job, "a1", key="a"),
            handle.spawn(log.job, "a2", key="a"),
            handle.spawn(log.job, "a3", key="a"),
            handle.spawn(log.job, "b1", key="b"),
            handle.spawn(log.job, "plain"),
        ]
        assert [j.status for j in jobs] == ["running", "queued", "queued", "running", "running"]
        check_invariants(runtime.statistics())
    t0 = log.starts()[0][0]
    starts = dict((name, t - t0) for t, name in log.starts())
    assert starts == {"a1": 0, "b1": 0, "plain": 0, "a2": 1, "a3": 2}


async def test_a_busy_key_does_not_block_the_jobs_behind_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with open_background_runtime(config(max_concurrent_tasks=2)) as runtime:
        handle = runtime.handle()
        handle.spawn(log.job, "a1", 10, key="a")
        handle.spawn(log.job, "x", 1)
        handle.spawn(log.job, "a2", 1, key="a")  # waits for a1
        handle.spawn(log.job, "y", 1)  # must not wait behind a2
        await trio.sleep(1.5)
        # "y" started when "x" ended, at 1 s, while "a2" still waits for "a1".
        t0 = log.starts()[0][0]
        assert sorted((t - t0, name) for t, name in log.starts()) == [
            (0, "a1"),
            (0, "x"),
            (1, "y"),
        ]
        check_invariants(runtime.statistics())
    assert log.starts()[-1][1] == "a2"


async def test_a_freed_key_goes_to_its_next_job_in_ready_order_among_all_ready_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # When "a1" ends, "a2" (ready since t=0) starts before "late" (ready since t=0.5).
    log = Log()
    async with open_background_runtime(config(max_concurrent_tasks=1)) as runtime:
        handle = runtime.handle()
        handle.spawn(log.job, "a1", 1, key="a")
        handle.spawn(log.job, "a2", 1, key="a")
        await trio.sleep(0.5)
        handle.spawn(log.job, "late", 1)
    assert [name for _, name in log.starts()] == ["a1", "a2", "late"]


# -- retries --------------------------------------------------------------------------------


class Flaky:
    """A job that fails its first ``failures`` runs, recording each run's start."""

    def __init__(self, failures: int, error: type[Exception] = ValueError) -> None:
        self.failures = failures
        self.error = error
        self.runs: list[float] = []

    async def __call__(self) -> str:
        self.runs.append(trio.current_time())
        if len(self.runs) <= self.failures:
            raise self.error(f"run {len(self.runs)}")
        return "ok"


async def test_retries_run_at_the_exact_backoff_instants_and_the_last_run_decides(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    retrying: list[tuple[str, float]] = []

    class Retrying:
        def job_retrying(
            self, job: BackgroundJobMetadata, exception: BaseException, delay: float
        ) -> None:
            retrying.append((str(exception), delay))

    flaky = Flaky(failures=3)
    retry = Retry(attempts=4, backoff=1.0, multiplier=3.0, max_backoff=5.0, jitter=False)
    cfg = config()
    async with open_background_runtime(cfg, instruments=[recorder, Retrying()]) as runtime:
        t0 = trio.current_time()
        job = runtime.handle().spawn(flaky, name="flaky", retry=retry)
        await trio.sleep(0.5)
        assert (job.status, job.attempt) == ("scheduled", 2)
        assert await job.wait() == "ok"
    assert [t - t0 for t in flaky.runs] == [0, 1, 4, 9]  # backoffs 1, 3, then capped at 5
    assert retrying == [("run 1", 1.0), ("run 2", 3.0), ("run 3", 5.0)]
    assert job.attempt == 4
    assert stats_of(runtime) == counted(completed=1, retried=3)
    assert [h for h, _ in recorder.pairs()] == ["accepted"] + ["started"] * 4 + ["finished"]
    assert messages(caplog, logging.WARNING) == [
        "background job 'flaky' failed on attempt 1 of 4; retrying in 1 seconds",
        "background job 'flaky' failed on attempt 2 of 4; retrying in 3 seconds",
        "background job 'flaky' failed on attempt 3 of 4; retrying in 5 seconds",
    ]


async def test_a_job_that_fails_every_attempt_fails_with_its_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flaky = Flaky(failures=10)
    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(flaky, retry=Retry(attempts=3, jitter=False))
        with pytest.raises(ValueError, match="run 3"):
            await job.wait()
    assert stats_of(runtime) == counted(failed=1, retried=2)


async def test_only_the_listed_exceptions_are_retried_and_timeouts_count_as_too_slow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow() -> None:
        await trio.sleep(10)

    async with open_background_runtime(config()) as runtime:
        handle = runtime.handle()
        other = handle.spawn(Flaky(1, KeyError), retry=Retry(on=ValueError, jitter=False))
        timing_out = handle.spawn(
            slow, timeout=1, retry=Retry(attempts=2, on=trio.TooSlowError, jitter=False)
        )
        await runtime.wait_idle()
    assert other.status == "failed"  # KeyError is not retried
    assert timing_out.status == "timed_out"
    assert timing_out.attempt == 2
    assert stats_of(runtime) == counted(failed=1, timed_out=1, retried=1)


async def test_jittered_backoffs_stay_within_their_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    delays: dict[str, list[float]] = {}

    class Retrying:
        def job_retrying(self, job: BackgroundJobMetadata, exception: object, delay: float) -> None:
            delays.setdefault(job.name, []).append(delay)

    retry = Retry(attempts=6, backoff=2.0, multiplier=2.0, max_backoff=10.0, jitter=True)
    async with open_background_runtime(config(), instruments=[Retrying()]) as runtime:
        for i in range(20):
            runtime.handle().spawn(Flaky(10), name=f"job {i}", retry=retry)
    assert sorted(len(d) for d in delays.values()) == [5] * 20
    bounds = [2.0, 4.0, 8.0, 10.0, 10.0]
    for name, values in delays.items():
        assert all(0 <= v <= bound for v, bound in zip(values, bounds, strict=True)), name
    assert len({v for values in delays.values() for v in values}) > 50  # drawn, not fixed


async def test_a_retry_is_never_refused_and_holds_no_queue_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_background_runtime(config(max_concurrent_tasks=1, max_queue_size=1)) as runtime:
        handle = runtime.handle()
        flaky = handle.spawn(Flaky(1), retry=Retry(attempts=2, backoff=1, jitter=False))
        await trio.testing.wait_all_tasks_blocked()
        assert flaky.status == "scheduled"  # its retry holds no place:
        handle.spawn(trio.sleep, 5)  # takes the slot
        handle.spawn(trio.sleep, 5)  # takes the only place
        await trio.sleep(1)  # the retry is due: it queues past max_queue_size
        await trio.testing.wait_all_tasks_blocked()
        stats = runtime.statistics()
        assert (stats.queued, stats.max_queue_size) == (2, 1)
        with pytest.raises(QueueFullError):
            handle.spawn(trio.sleep, 5)
    assert flaky.status == "completed"
    assert stats_of(runtime) == counted(completed=3, retried=1, rejected=1)


async def test_a_key_is_held_through_the_backoff(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []

    async def record(name: str) -> None:
        log.append((trio.current_time(), name))

    flaky = Flaky(1)
    async with open_background_runtime(config(max_concurrent_tasks=4)) as runtime:
        handle = runtime.handle()
        t0 = trio.current_time()
        handle.spawn(flaky, key="k", retry=Retry(attempts=2, backoff=3, jitter=False))
        await trio.testing.wait_all_tasks_blocked()
        handle.spawn(record, "next of k", key="k")
        handle.spawn(record, "other")
    assert [t - t0 for t in flaky.runs] == [0, 3]
    assert [(t - t0, name) for t, name in log] == [(0, "other"), (3, "next of k")]


# -- shutdown -------------------------------------------------------------------------------


async def test_the_drain_waits_for_scheduled_jobs_due_before_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with open_background_runtime(config(drain_timeout=10)) as runtime:
        runtime.handle().spawn(log.job, "due in 3", delay=3)
        t0 = trio.current_time()
    assert log.starts() == [(t0 + 3, "due in 3")]
    assert stats_of(runtime) == counted(completed=1)


async def test_jobs_due_after_the_deadline_are_dropped_at_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(BackgroundShutdownError) as info:
        async with open_background_runtime(config(drain_timeout=10)) as runtime:
            handle = runtime.handle()
            handle.spawn(trio.sleep, 1, name="short")
            handle.spawn(trio.sleep, 1, name="late", delay=60)
            handle.spawn(
                Flaky(5), name="backoff", retry=Retry(attempts=3, backoff=30, jitter=False)
            )
            t0 = trio.current_time()
    # The short job ran; then only jobs due after the deadline were left: dropped at once.
    assert trio.current_time() - t0 == 1
    assert [m.name for m in info.value.dropped] == ["late", "backoff"]
    assert info.value.cancelled == ()
    assert str(info.value).startswith("drain cut short")
    assert stats_of(runtime) == counted(completed=1, dropped=2, retried=1)
    assert (
        "background job 'backoff' dropped at shutdown while waiting to retry (attempt 2 of 3)"
        in messages(caplog, logging.WARNING)
    )


async def test_cut_off_drops_jobs_in_every_waiting_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    jobs: list[BackgroundJob[Any]] = []
    with pytest.raises(BackgroundShutdownError) as info:
        async with open_background_runtime(
            config(max_concurrent_tasks=1, drain_timeout=1)
        ) as runtime:
            handle = runtime.handle()
            jobs.append(handle.spawn(trio.sleep_forever, name="running", key="k"))
            jobs.append(handle.spawn(trio.sleep_forever, name="line", key="k"))
            jobs.append(handle.spawn(trio.sleep_forever, name="queued"))
            jobs.append(handle.spawn(trio.sleep_forever, name="scheduled", delay=0.5))
    assert [j.status for j in jobs] == ["cancelled", "dropped", "dropped", "dropped"]
    assert [m.name for m in info.value.dropped] == ["line", "queued", "scheduled"]
    assert stats_of(runtime) == counted(cancelled=1, dropped=3)


# -- ordering invariants, over random plans -------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
async def test_keys_ready_order_and_work_conservation_over_random_plans(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    import random

    rng = random.Random(seed)
    slots = rng.randint(1, 4)
    running: dict[str | None, int] = {}
    started: list[tuple[float, int, str | None]] = []
    ready_at: dict[int, float] = {}
    problems: list[str] = []
    jobs: list[BackgroundJob[Any]] = []

    async def work(i: int, key: str | None, seconds: float) -> None:
        if key is not None and running.get(key):
            problems.append(f"job {i}: key {key} already running")
        running[key] = running.get(key, 0) + 1
        started.append((trio.current_time(), i, key))
        await trio.sleep(seconds)
        running[key] -= 1

    def conserving() -> None:
        s = runtime.statistics()
        check_invariants(s)
        # Work conservation: with a free slot, no queued job may have a free key.
        if s.running < s.max_concurrent_tasks:
            busy = {k for k, n in running.items() if n}
            for job in jobs:
                if job.status == "queued":
                    key = keys[id(job)]
                    if key is None or (
                        key not in busy
                        and not any(
                            keys[id(o)] == key and o.status in ("running", "scheduled")
                            for o in jobs
                            if o is not job and o.status != "queued"
                        )
                    ):
                        problems.append(f"free slot while a ready job waits: {s}")
                        return

    keys: dict[int, str | None] = {}
    cfg = config(max_concurrent_tasks=slots, max_queue_size=200)
    async with open_background_runtime(cfg) as runtime:
        handle = runtime.handle()
        for i in range(60):
            key = rng.choice([None, "a", "b", "c"])
            delay = rng.choice([None, None, 0.5, 1.5])
            job = handle.spawn(work, i, key, rng.choice([0.25, 0.5, 1.0]), key=key, delay=delay)
            jobs.append(job)
            keys[id(job)] = key
            ready_at[i] = trio.current_time() + (delay or 0)
            if rng.random() < 0.3:
                await trio.sleep(rng.choice([0.25, 0.5]))
                await trio.testing.wait_all_tasks_blocked()
                conserving()
    assert problems == []
    # Per key: starts in ready order (ties by acceptance order).
    for key in ("a", "b", "c"):
        order = [i for _, i, k in started if k == key]
        assert order == sorted(order, key=lambda i: (ready_at[i], i)), (key, order)
    assert all(job.status == "completed" for job in jobs)


async def test_an_aclose_waiting_on_the_drain_returns_as_soon_as_a_cut_off_ends_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # aclose() drains with a 100 s deadline; at 1 s the block's body is cancelled, which
    # cuts the runtime off: the waiting aclose() must return then, not at the deadline.
    returned: list[float] = []

    async def closer(runtime: Any) -> None:
        try:
            await runtime.aclose()
        finally:
            returned.append(trio.current_time())

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1):  # cancels the body from outside: a cut-off
            async with open_background_runtime(config(drain_timeout=100)) as runtime:
                runtime.handle().spawn(trio.sleep_forever)
                nursery.start_soon(closer, runtime)
                await trio.sleep_forever()
    assert [t - t0 for t in returned] == [1]


async def test_the_report_lists_cut_off_jobs_in_acceptance_order_not_start_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # "delayed" is accepted first but starts after "plain"; "flaky" is accepted before
    # "after" but its retry starts later. Both lists are in acceptance order.
    async def fails_once() -> None:
        if current_job().attempt == 1:
            raise ValueError("once")
        await trio.sleep_forever()

    with pytest.raises(BackgroundShutdownError) as info:
        async with open_background_runtime(
            config(max_concurrent_tasks=4, drain_timeout=5)
        ) as runtime:
            handle = runtime.handle()
            handle.spawn(trio.sleep_forever, name="delayed", delay=1)
            handle.spawn(trio.sleep_forever, name="plain")
            handle.spawn(fails_once, name="flaky", retry=Retry(backoff=2, jitter=False))
            handle.spawn(trio.sleep_forever, name="after")
    assert [m.name for m in info.value.cancelled] == ["delayed", "plain", "flaky", "after"]


async def test_a_cut_off_keeps_nothing_of_keyed_jobs_in_backoff_or_unstarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import gc
    import weakref

    class Arg:
        pass

    args = [Arg(), Arg()]
    watched = [weakref.ref(a) for a in args]
    with pytest.raises(BackgroundShutdownError):
        async with open_background_runtime(config(drain_timeout=1)) as runtime:
            handle = runtime.handle()
            handle.spawn(Flaky(5), key="k", retry=Retry(backoff=100, jitter=False))
            await trio.testing.wait_all_tasks_blocked()  # in backoff, holding "k"

            async def uses(arg: Arg) -> None:
                await trio.sleep_forever()

            handle.spawn(uses, args.pop(), key="j")  # holds "j", its code not run yet
            handle.spawn(uses, args.pop(), key="k")  # waits for "k"
    gc.collect()
    assert [ref() for ref in watched] == [None, None]
    assert runtime._runtime.admission.keys == {}


def test_a_retry_is_reported_before_the_cut_off_its_log_handler_caused() -> None:
    # The log handler of the retry warning raises KeyboardInterrupt: the cut-off drops the
    # job waiting to retry. Instruments see the run end (retrying), then the drop.
    calls: list[str] = []

    class Hooks:
        def job_started(self, job: object) -> None:
            calls.append("started")

        def job_retrying(self, job: object, exception: object, delay: float) -> None:
            calls.append("retrying")

        def job_dropped(self, job: object) -> None:
            calls.append("dropped")

    class Interrupting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying" in record.getMessage():
                raise KeyboardInterrupt

    async def main() -> None:
        async with open_background_runtime(config(), instruments=[Hooks()]) as runtime:
            runtime.handle().spawn(Flaky(5), retry=Retry(backoff=1, jitter=False))
            await trio.sleep(10)

    logger = logging.getLogger("trio_background")
    handler = Interrupting()
    logger.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(handler)
    assert calls == ["started", "retrying", "dropped"]


# -- instruments ----------------------------------------------------------------------------


class Hooks:
    """Every hook call as ``(instant, hook, job name, *details)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def add(self, hook: str, job: BackgroundJobMetadata, *details: object) -> None:
        self.calls.append((trio.current_time(), hook, job.name, *details))

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.add("accepted", job)

    def job_scheduled(self, job: BackgroundJobMetadata, delay: float) -> None:
        self.add("scheduled", job, delay)

    def job_due(self, job: BackgroundJobMetadata) -> None:
        self.add("due", job)

    def job_started(self, job: BackgroundJobMetadata) -> None:
        self.add("started", job)

    def job_retrying(
        self, job: BackgroundJobMetadata, exception: BaseException, delay: float
    ) -> None:
        self.add("retrying", job, delay)

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.add("finished", job, outcome)

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.add("dropped", job)


async def test_instruments_see_jobs_scheduled_and_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = Hooks()
    cfg = config(max_concurrent_tasks=1, max_queue_size=2)
    async with open_background_runtime(cfg, instruments=[hooks]) as runtime:
        handle = runtime.handle()
        t0 = trio.current_time()
        handle.spawn(Flaky(1), name="flaky", retry=Retry(backoff=1, jitter=False))
        handle.spawn(trio.sleep, 3, name="late", delay=2.5)
        cut = handle.spawn(trio.sleep, 1, name="cut", delay=4)  # the last place
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(handle.send, trio.sleep, 1, name="sent", delay=1))
            await trio.testing.wait_all_tasks_blocked()
            cut.cancel()  # its place goes to the waiting send
        await runtime.wait_idle()
    assert [(t - t0, *rest) for t, *rest in hooks.calls] == [
        (0, "accepted", "flaky"),
        (0, "accepted", "late"),
        (0, "scheduled", "late", 2.5),
        (0, "accepted", "cut"),
        (0, "scheduled", "cut", 4),
        (0, "started", "flaky"),
        (0, "retrying", "flaky", 1),  # (a retry is scheduled: job_retrying says so)
        (0, "accepted", "sent"),  # (what a hand-off did comes first, as everywhere)
        (0, "scheduled", "sent", 1),
        (0, "dropped", "cut"),
        (1, "due", "flaky"),  # due at the same instant: in acceptance order
        (1, "due", "sent"),
        (1, "started", "flaky"),
        (1, "finished", "flaky", "completed"),
        (1, "started", "sent"),
        (2, "finished", "sent", "completed"),
        (2.5, "due", "late"),
        (2.5, "started", "late"),
        (5.5, "finished", "late", "completed"),
    ]


async def test_instruments_see_scheduled_jobs_dropped_at_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = Hooks()
    with pytest.raises(BackgroundShutdownError):
        async with open_background_runtime(
            config(drain_timeout=10), instruments=[hooks]
        ) as runtime:
            handle = runtime.handle()
            handle.spawn(trio.sleep, 1, name="never", delay=100)
            handle.spawn(Flaky(5), name="flaky", retry=Retry(backoff=50, jitter=False))
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
    # Both are due after the deadline: dropped at once.
    assert sorted((t - t0, *rest) for t, *rest in hooks.calls[-2:]) == [
        (0, "dropped", "flaky"),
        (0, "dropped", "never"),
    ]
    assert [hook for _, hook, *_ in hooks.calls[:-2]] == [
        "accepted",
        "scheduled",
        "accepted",
        "started",
        "retrying",
    ]


async def test_a_job_due_as_another_ends_is_reported_due_whichever_task_runs_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # At t=1 "ends" ends and "waiter" is due; its key is busy until 2. The runtime may see
    # either first (Trio runs tasks woken at one instant in a random order): both ways,
    # instruments see it due at 1. Ten rounds miss one way with odds of 1 in 1024.
    for _ in range(10):
        hooks = Hooks()
        async with open_background_runtime(config(), instruments=[hooks]) as runtime:
            handle = runtime.handle()
            t0 = trio.current_time()
            handle.spawn(trio.sleep, 2, name="holder", key="a")
            handle.spawn(trio.sleep, 1, name="ends")
            handle.spawn(trio.sleep, 1, name="waiter", key="a", delay=1)
        seen = [(t - t0, hook) for t, hook, name, *_ in hooks.calls if name == "waiter"]
        assert seen == [
            (0, "accepted"),
            (0, "scheduled"),
            (1, "due"),
            (2, "started"),
            (3, "finished"),
        ]


@pytest.mark.parametrize("seed", range(12))
async def test_the_hooks_follow_every_job_through_random_programs(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    tracker = Tracker()
    handles: list[BackgroundJob[None]] = []
    rng = random.Random(seed)

    def check() -> None:
        s = runtime.statistics()  # (shrinks and retries may exceed the caps: not checked)
        from_handles = dict.fromkeys(tracker.statuses(), 0)
        for job in handles:
            from_handles[job.status] += 1
        counters = {status: getattr(s, status) for status in from_handles}
        assert tracker.statuses() == from_handles == counters
        assert s.accepted == len(handles)
        assert tracker.errors == []

    cfg = config(max_concurrent_tasks=2, max_queue_size=3, drain_timeout=rng.choice((0.75, 60)))
    with contextlib.suppress(BackgroundShutdownError):
        async with open_background_runtime(cfg, instruments=[tracker]) as runtime:
            await random_waits(rng, runtime, handles, check, steps=40)
    check()


def test_a_spawn_that_finds_a_job_due_and_its_hook_interrupts_accepts_nothing() -> None:
    # spawn() makes the due job ready first; its job_due hook raises KeyboardInterrupt,
    # which cuts the runtime off: the spawn must refuse its job (accepting it would leave
    # it queued in a runtime that has ended, and leaving the block would never return).
    clock = trio.testing.MockClock(rate=0, autojump_threshold=math.inf)
    seen: dict[str, Any] = {}

    class InterruptWhenDue:
        def job_due(self, job: BackgroundJobMetadata) -> None:
            raise KeyboardInterrupt

    async def main() -> None:
        cfg = config(max_concurrent_tasks=1)
        async with open_background_runtime(cfg, instruments=[InterruptWhenDue()]) as runtime:
            handle = runtime.handle()
            handle.spawn(trio.sleep, 50, name="busy")
            handle.spawn(trio.sleep, 0, name="due", delay=5)
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(5)  # due now; the timer task has not run yet
            with pytest.raises(RuntimeClosedError):
                handle.spawn(trio.sleep, 0, name="late")
            seen["stats"] = runtime.statistics()

    with pytest.raises(KeyboardInterrupt):
        trio.run(main, clock=clock)
    stats = seen["stats"]
    assert (stats.accepted, stats.queued, stats.scheduled, stats.dropped) == (2, 0, 0, 1)


async def test_a_cancelled_send_that_held_others_up_lets_the_next_one_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No queue places: a delayed job cannot be accepted, and its waiting send() holds up
    # the one behind it (senders are accepted in the order they began to wait), even with
    # the slot free. Once that send is cancelled, the next one starts at once.
    cfg = config(max_concurrent_tasks=1, max_queue_size=0)
    async with open_background_runtime(cfg) as runtime:
        handle = runtime.handle()
        running = handle.spawn(trio.sleep, 100, name="running")
        sent: list[BackgroundJob[None]] = []

        async def send(**options: Any) -> None:
            sent.append(await handle.send(trio.sleep, 1, **options))

        delayed = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(_cancelled_by, delayed, send, delay=0.5))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(partial(send, name="next"))
            await trio.testing.wait_all_tasks_blocked()
            running.cancel()  # the slot is free; "next" still waits behind the delayed one
            await trio.testing.wait_all_tasks_blocked()
            assert sent == []
            delayed.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert [job.metadata.name for job in sent] == ["next"]
            assert sent[0].status == "running"


async def _cancelled_by(scope: trio.CancelScope, send: Any, **options: Any) -> None:
    with scope:
        await send(**options)


def test_a_backoff_of_zero_stays_zero_however_far_the_multiplier_grows() -> None:
    # The growth overflows a float (1e300 ** 2): zero times it is still zero, not the cap.
    retry = Retry(attempts=5, backoff=0.0, multiplier=1e300, max_backoff=60.0, jitter=False)
    assert [retry.delay(run, random.random) for run in (1, 2, 3, 4)] == [0.0, 0.0, 0.0, 0.0]
    growing = Retry(attempts=5, backoff=1.0, multiplier=1e300, max_backoff=60.0, jitter=False)
    assert [growing.delay(run, random.random) for run in (1, 2, 3)] == [1.0, 60.0, 60.0]
