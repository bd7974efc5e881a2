"""Runtime behaviour beyond the seed: contextvars, threads, errors, timeouts, shutdown, send.

All timing uses virtual time (``autojump_clock``), so exact ``trio.current_time()`` values
are asserted wherever the contract pins them down.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import pytest
import trio
import trio.testing
from helpers import counts, records

from trio_background import (
    BackgroundHandle,
    BackgroundInstrument,
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)

request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")

# -- contextvars ------------------------------------------------------------------------


# -- threads ----------------------------------------------------------------------------


# -- failures ---------------------------------------------------------------------------


# -- timeouts ---------------------------------------------------------------------------


# -- shutdown ---------------------------------------------------------------------------


async def test_cancelled_aclose_cuts_off_at_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=30.0)
    cancelled_at: list[float] = []
    t0 = trio.current_time()

    async def job() -> None:
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            cancelled_at.append(trio.current_time() - t0)
            raise

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(job, name="running")
        handle.spawn(job, name="queued-1")
        handle.spawn(job, name="queued-2")
        with trio.move_on_after(1) as scope:
            await runtime.aclose()
        assert scope.cancelled_caught  # the cancellation propagated out of aclose()
        assert trio.current_time() - t0 == 1.0  # cut off at once, not after drain_timeout
        # Counted as at the deadline, and the cancelled job has really ended.
        assert runtime.statistics().closed
        assert counts(runtime) == {"cancelled": 1, "dropped": 2}
        assert cancelled_at == [1.0]
    # Leaving the block calls aclose() again: nothing left to report.
    assert trio.current_time() - t0 == 1.0
    warned = sorted(r.__dict__["job_name"] for r in records(caplog, logging.WARNING))
    assert warned == ["queued-1", "queued-2", "running"]


async def test_no_job_running_after_cancelled_aclose_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Contract invariant: "after aclose() returns or raises, queued == running == 0".
    async def job() -> None:
        await trio.sleep(100)

    async with open_background_runtime() as runtime:
        runtime.handle().spawn(job)
        with trio.move_on_after(1):
            await runtime.aclose()
        stats = runtime.statistics()
        assert (stats.queued, stats.running) == (0, 0)
        assert stats.cancelled == 1


async def test_aclose_from_inside_job_raises(autojump_clock: trio.testing.MockClock) -> None:
    errors: list[str] = []

    async with open_background_runtime() as runtime:

        async def closer() -> None:
            with pytest.raises(RuntimeError, match=r"would wait for itself") as excinfo:
                await runtime.aclose()
            errors.append(str(excinfo.value))
            with pytest.raises(RuntimeError, match=r"would wait for itself") as excinfo:
                await runtime.wait_idle()
            errors.append(str(excinfo.value))

        async def nested() -> None:
            # A task in a nursery inside a job still belongs to that job.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closer)

        async def quick() -> None:
            pass

        runtime.handle().spawn(closer)
        runtime.handle().spawn(nested)
        await runtime.wait_idle()
        assert len(errors) == 4
        assert counts(runtime) == {"completed": 2}
        # That call did not close the runtime.
        assert not runtime.statistics().closed
        runtime.handle().spawn(quick)
        await runtime.wait_idle()
        assert counts(runtime) == {"completed": 3}


async def test_body_exception_propagates_unchanged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=30.0)
    error = ValueError("body failed")
    observed_cancel = False
    queued_ran = False
    t0 = trio.current_time()

    async def running() -> None:
        nonlocal observed_cancel
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            observed_cancel = True
            raise

    async def queued() -> None:
        nonlocal queued_ran
        queued_ran = True

    runtimes: list[BackgroundRuntime] = []

    async def body() -> None:
        async with open_background_runtime(config) as runtime:
            runtimes.append(runtime)
            runtime.handle().spawn(running)
            runtime.handle().spawn(queued)
            await trio.sleep(0.5)
            raise error

    with pytest.raises(ValueError, match=r"^body failed$") as excinfo:
        await body()
    assert excinfo.value is error  # same object, no ExceptionGroup around it
    assert trio.current_time() - t0 == 0.5  # no drain
    assert observed_cancel
    assert not queued_ran
    [runtime] = runtimes
    assert counts(runtime) == {"cancelled": 1, "dropped": 1}
    assert runtime.statistics().closed
    assert len(records(caplog, logging.WARNING)) == 2


async def test_body_cancelled_from_outside(
    autojump_clock: trio.testing.MockClock, small_config: BackgroundTaskConfig
) -> None:
    config = small_config  # two slots, two queued, drain_timeout=5 (never reached)
    cancelled_at: list[float] = []
    t0 = trio.current_time()

    async def job() -> None:
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            cancelled_at.append(trio.current_time() - t0)
            raise

    runtime: BackgroundRuntime | None = None
    with trio.move_on_after(2.5) as scope:
        async with open_background_runtime(config) as runtime:
            for _ in range(3):
                runtime.handle().spawn(job)
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() - t0 == 2.5  # no drain
    assert cancelled_at == [2.5, 2.5]
    assert runtime is not None
    assert counts(runtime) == {"cancelled": 2, "dropped": 1}


async def test_aclose_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    async def job() -> None:
        await trio.sleep(2)

    async with open_background_runtime() as runtime:
        runtime.handle().spawn(job)
        results: list[tuple[str, float]] = []

        async def close(label: str) -> None:
            await runtime.aclose()  # neither call raises
            results.append((label, trio.current_time()))

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(close, "second")
        # The second, concurrent call waited for the first to finish.
        assert sorted(results) == [("first", t0 + 2), ("second", t0 + 2)]
        await runtime.aclose()
        assert trio.current_time() == t0 + 2
        assert counts(runtime) == {"completed": 1}


async def test_aclose_concurrent_only_first_raises(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(drain_timeout=1.0)

    async def job() -> None:
        await trio.sleep(100)

    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job, name="stuck")
        outcomes: dict[str, object] = {}

        async def close(label: str) -> None:
            try:
                await runtime.aclose()
            except BackgroundShutdownError as exc:
                outcomes[label] = exc
            else:
                outcomes[label] = None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(close, "second")
        first = outcomes["first"]
        assert isinstance(first, BackgroundShutdownError)
        assert first.cancelled == (BackgroundJobMetadata(name="stuck"),)
        assert outcomes["second"] is None
        await runtime.aclose()


async def test_idle_aclose_returns_none_with_zero_drain_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def quick() -> None:
        pass

    config = BackgroundTaskConfig(drain_timeout=0.0)
    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(quick)
        await runtime.wait_idle()
        t0 = trio.current_time()
        await runtime.aclose()
        # No polling floor: not even a virtual tick passed.
        assert trio.current_time() == t0
        assert counts(runtime) == {"completed": 1}
    async with open_background_runtime(config) as runtime:
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() == t0


async def test_wait_idle(
    autojump_clock: trio.testing.MockClock, small_config: BackgroundTaskConfig
) -> None:
    config = small_config  # two slots, two queued
    woke: list[float] = []

    async def job(duration: float) -> None:
        await trio.sleep(duration)

    async with open_background_runtime(config) as runtime:
        t0 = trio.current_time()
        await runtime.wait_idle()  # already idle: returns at once
        assert trio.current_time() == t0
        handle = runtime.handle()
        for duration in (1.0, 3.0, 1.5, 0.25):
            handle.spawn(job, duration)

        async def waiter() -> None:
            await runtime.wait_idle()
            woke.append(trio.current_time() - t0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            nursery.start_soon(waiter)
        # Slots: 1.0 [0,1], 3.0 [0,3], 1.5 [1,2.5], 0.25 [2.5,2.75] -> idle at 3.
        assert woke == [3.0, 3.0]
        stats = runtime.statistics()
        assert (stats.queued, stats.running, stats.completed) == (0, 0, 4)


# -- instruments ------------------------------------------------------------------------


class EventLog(BackgroundInstrument):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.events.append(("accepted", job))

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        self.events.append(("rejected", job))

    def job_started(self, job: BackgroundJobMetadata) -> None:
        self.events.append(("started", job))

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.events.append(("finished", job, outcome, duration))

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.events.append(("dropped", job))

    def take(self) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        return events


async def test_instruments_every_hook(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=1, max_concurrent_tasks=1, drain_timeout=1.5)
    log = EventLog()

    async def job(duration: float, fail: bool = False) -> None:
        await trio.sleep(duration)
        if fail:
            raise BackgroundJobError("failed on purpose")

    def meta(name: str) -> BackgroundJobMetadata:
        return BackgroundJobMetadata(name=name, request_id=f"rid-{name}")

    async def scenario() -> None:
        async with open_background_runtime(config, instruments=[log]) as runtime:
            handle = runtime.handle()
            handle.spawn(job, 2.5, name="a", request_id="rid-a")
            await trio.testing.wait_all_tasks_blocked()
            assert log.take() == [("accepted", meta("a")), ("started", meta("a"))]

            handle.spawn(job, 1.0, True, name="b", request_id="rid-b")
            assert log.take() == [("accepted", meta("b"))]

            with pytest.raises(QueueFullError):
                handle.spawn(job, 0.0, name="c", request_id="rid-c")
            assert log.take() == [("rejected", meta("c"))]

            await runtime.wait_idle()
            assert log.take() == [
                ("finished", meta("a"), "completed", 2.5),
                ("started", meta("b")),
                ("finished", meta("b"), "failed", 1.0),
            ]

            handle.spawn(job, 100.0, name="d", request_id="rid-d", timeout=0.5)
            await runtime.wait_idle()
            assert log.take() == [
                ("accepted", meta("d")),
                ("started", meta("d")),
                ("finished", meta("d"), "timed_out", 0.5),
            ]

            handle.spawn(job, 100.0, name="e", request_id="rid-e")
            await trio.sleep(0.25)
            handle.spawn(job, 0.0, name="f", request_id="rid-f")
            assert log.take() == [
                ("accepted", meta("e")),
                ("started", meta("e")),
                ("accepted", meta("f")),
            ]

    with pytest.raises(BackgroundShutdownError):
        await scenario()
    # e ran 0.25 before close and 1.5 of drain.
    assert sorted(log.take()) == [
        ("dropped", meta("f")),
        ("finished", meta("e"), "cancelled", 1.75),
    ]


async def test_raising_instrument_is_logged_once_and_removed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(BackgroundInstrument):
        def __init__(self) -> None:
            self.calls = 0

        def job_accepted(self, job: BackgroundJobMetadata) -> None:
            self.calls += 1
            raise RuntimeError("instrument bug")

        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            self.calls += 1

    broken = Broken()
    healthy = EventLog()
    ran: list[int] = []

    async def job(i: int) -> None:
        await trio.sleep(1)
        ran.append(i)

    async with open_background_runtime(instruments=[broken, healthy]) as runtime:
        handle = runtime.handle()
        handle.spawn(job, 1)  # the job is accepted and runs despite the raising hook
        handle.spawn(job, 2)
        await runtime.wait_idle()
        assert sorted(ran) == [1, 2]
        assert counts(runtime) == {"completed": 2}
        await runtime.aclose()
    # Called once, then removed: not even its other, working hook is called again.
    assert broken.calls == 1
    finished = [e for e in healthy.events if e[0] == "finished"]
    assert len(finished) == 2
    assert [e[0] for e in healthy.events].count("accepted") == 2
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)


async def test_partial_instrument_without_base_class(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class OnlyFinished:
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, float]] = []

        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            self.seen.append((job.name, outcome, duration))

    only = OnlyFinished()

    async def job(duration: float) -> None:
        await trio.sleep(duration)

    async def fail() -> None:
        raise ValueError("x")

    async with open_background_runtime(instruments=[only]) as runtime:
        runtime.handle().spawn(job, 0.75, name="slowish")
        runtime.handle().spawn(fail)
        await runtime.aclose()
        with pytest.raises(RuntimeClosedError):
            runtime.handle().spawn(job, 0.0)
    assert sorted(only.seen) == [("slowish", "completed", 0.75), (fail.__qualname__, "failed", 0.0)]
    assert counts(runtime) == {"completed": 1, "failed": 1}


async def test_handles_are_typed_public_objects() -> None:
    async with open_background_runtime() as runtime:
        assert type(runtime.handle()) is BackgroundHandle
