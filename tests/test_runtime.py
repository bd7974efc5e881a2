"""Runtime behaviour beyond the seed: contextvars, threads, errors, timeouts, shutdown, send.

All timing uses virtual time (``autojump_clock``), so exact ``trio.current_time()`` values
are asserted wherever the contract pins them down.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
import trio
import trio.testing
from helpers import counts, records

from trio_background import (
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


async def test_job_sees_context_captured_at_submit(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[tuple[str, str]] = []

    async def job(label: str) -> None:
        seen.append((label, request_var.get()))

    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        request_var.set("first")
        handle.spawn(job, "a")  # starts at once
        request_var.set("second")  # changed before the job's task ever ran
        handle.spawn(job, "b")
        request_var.set("third")
        await runtime.wait_idle()
    assert sorted(seen) == [("a", "first"), ("b", "second")]


async def test_queued_job_sees_context_captured_at_submit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=1)
    seen: list[tuple[str, str]] = []
    gate = trio.Event()

    async def job(label: str) -> None:
        seen.append((label, request_var.get()))

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(gate.wait)
        for label in ("q1", "q2", "q3"):
            request_var.set(f"value-{label}")
            handle.spawn(job, label)
        request_var.set("later")
        assert runtime.statistics().queued == 3
        gate.set()
        await runtime.wait_idle()
    # Not the dispatcher's context, not another job's, not the submitter's later value.
    assert seen == [("q1", "value-q1"), ("q2", "value-q2"), ("q3", "value-q3")]


async def test_job_context_mutation_does_not_leak(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=1)
    seen: list[tuple[str, str]] = []

    async def mutator(label: str) -> None:
        seen.append((label, request_var.get()))
        request_var.set(f"mutated-by-{label}")
        await trio.sleep(1)
        seen.append((label + "-after", request_var.get()))

    async def observer(label: str) -> None:
        seen.append((label, request_var.get()))

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        request_var.set("submitter")
        handle.spawn(mutator, "m1")  # runs at once
        handle.spawn(observer, "o1")  # queued behind m1
        handle.spawn(mutator, "m2")  # queued
        handle.spawn(observer, "o2")  # queued
        await trio.testing.wait_all_tasks_blocked()
        assert request_var.get() == "submitter"
        await runtime.wait_idle()
        assert request_var.get() == "submitter"
    assert seen == [
        ("m1", "submitter"),
        ("m1-after", "mutated-by-m1"),
        ("o1", "submitter"),
        ("m2", "submitter"),
        ("m2-after", "mutated-by-m2"),
        ("o2", "submitter"),
    ]


async def test_each_submitter_task_context(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=0, max_concurrent_tasks=1)
    seen: dict[str, str] = {}

    async def job(label: str) -> None:
        seen[label] = request_var.get()
        await trio.sleep(1)

    async with open_background_runtime(config) as runtime:

        async def submitter(label: str) -> None:
            request_var.set(f"ctx-{label}")
            # With max_queue_size=0 all but the first wait in send(); each job must still
            # run in its own submitter's context, not the task that freed the slot.
            await runtime.handle().send(job, label)

        async with trio.open_nursery() as nursery:
            for label in ("x", "y", "z"):
                nursery.start_soon(submitter, label)
        await runtime.wait_idle()
    assert seen == {"x": "ctx-x", "y": "ctx-y", "z": "ctx-z"}


# -- threads ----------------------------------------------------------------------------


async def test_spawn_from_foreign_thread_raises() -> None:
    ran: list[int] = []

    async def job(n: int) -> None:
        ran.append(n)

    async with open_background_runtime() as runtime:
        handle = runtime.handle()

        def from_worker_thread() -> str:
            try:
                handle.spawn(job, 1)
            except RuntimeError as exc:
                return str(exc)
            return "accepted"

        message = await trio.to_thread.run_sync(from_worker_thread)
        assert "trio.from_thread.run_sync" in message
        await trio.testing.wait_all_tasks_blocked()
        assert ran == []
        assert counts(runtime) == {}
        assert runtime.statistics().accepted == 0

        def the_right_way() -> None:
            trio.from_thread.run_sync(handle.spawn, job, 2)
            trio.from_thread.run_sync(functools.partial(handle.spawn, job, 3, name="three"))

        await trio.to_thread.run_sync(the_right_way)
        await runtime.wait_idle()
        assert sorted(ran) == [2, 3]
        assert counts(runtime) == {"completed": 2}


# -- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_base_exception_from_job_propagates_bare(
    autojump_clock: trio.testing.MockClock, exc_type: type[BaseException]
) -> None:
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=2, drain_timeout=10.0)
    sleeper_cancelled = False
    queued_ran = False
    t0 = trio.current_time()

    async def sleeper() -> None:
        nonlocal sleeper_cancelled
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            sleeper_cancelled = True
            raise

    async def interrupter() -> None:
        await trio.sleep(1)
        raise exc_type

    async def queued() -> None:
        nonlocal queued_ran
        queued_ran = True

    runtimes: list[BackgroundRuntime] = []

    async def body() -> None:
        async with open_background_runtime(config) as runtime:
            runtimes.append(runtime)
            handle = runtime.handle()
            handle.spawn(sleeper)
            handle.spawn(interrupter)
            handle.spawn(queued)
            handle.spawn(queued)
            await trio.sleep_forever()

    with pytest.raises(exc_type) as excinfo:
        await body()
    assert type(excinfo.value) is exc_type  # bare, not wrapped in an ExceptionGroup
    assert trio.current_time() - t0 == 1.0
    assert sleeper_cancelled
    assert not queued_ran
    [runtime] = runtimes
    assert counts(runtime) == {"failed": 1, "cancelled": 1, "dropped": 2}
    assert runtime.statistics().closed


async def test_job_exception_logged_and_counted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    raised: list[BaseException] = []
    finished: list[str] = []

    async def bad() -> None:
        await trio.sleep(0.5)
        exc = ValueError("kaput")
        raised.append(exc)
        raise exc

    async def good(label: str) -> None:
        await trio.sleep(1)
        finished.append(label)

    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        handle.spawn(good, "before")
        handle.spawn(bad, name="bad-job", request_id="rid-7")
        handle.spawn(good, "after")
        await runtime.wait_idle()
        assert counts(runtime) == {"completed": 2, "failed": 1}
        assert sorted(finished) == ["after", "before"]
        await runtime.aclose()
    [record] = records(caplog, logging.ERROR)
    assert record.__dict__["job_name"] == "bad-job"
    assert record.__dict__["request_id"] == "rid-7"
    assert record.exc_info is not None
    assert record.exc_info[1] is raised[0]
    assert "bad-job" in record.getMessage()
    assert "Traceback" in caplog.text
    assert "ValueError: kaput" in caplog.text


async def test_background_job_error_counts_failed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def job() -> None:
        raise BackgroundJobError("nope")

    async with open_background_runtime() as runtime:
        runtime.handle().spawn(job)
        await runtime.wait_idle()
        assert counts(runtime) == {"failed": 1}
    [record] = records(caplog, logging.ERROR)
    assert record.__dict__["job_name"] == job.__qualname__
    assert record.__dict__["request_id"] is None
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], BackgroundJobError)
    assert record.exc_info[1].message == "nope"


async def test_sync_callable_counts_failed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def not_async(n: int) -> int:
        calls.append(n)
        return n

    async with open_background_runtime() as runtime:
        # Accepted (it is callable), but fails when it starts: it returned no coroutine.
        fn = cast("Callable[[int], Awaitable[None]]", not_async)
        runtime.handle().spawn(fn, 5, name="sync-fn")
        await runtime.wait_idle()
        assert calls == [5]
        assert counts(runtime) == {"failed": 1}
        await runtime.aclose()
    [record] = records(caplog, logging.ERROR)
    assert record.__dict__["job_name"] == "sync-fn"
    assert record.exc_info is not None
    assert record.exc_info[0] is TypeError


# -- timeouts ---------------------------------------------------------------------------


async def test_per_job_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cancelled_at: list[float] = []
    t0 = trio.current_time()

    async def slow() -> None:
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            cancelled_at.append(trio.current_time() - t0)
            raise

    async def quick() -> None:
        await trio.sleep(2)

    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        handle.spawn(slow, name="slow", request_id="r-slow", timeout=2.5)
        handle.spawn(quick, timeout=3.0)
        await runtime.wait_idle()
        assert trio.current_time() - t0 == 2.5
        assert cancelled_at == [2.5]
        assert counts(runtime) == {"timed_out": 1, "completed": 1}
        await runtime.aclose()
    [record] = records(caplog, logging.WARNING)
    assert record.__dict__["job_name"] == "slow"
    assert record.__dict__["request_id"] == "r-slow"
    assert records(caplog, logging.ERROR) == []


async def test_config_job_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = BackgroundTaskConfig(job_timeout=1.5)
    ended: dict[str, tuple[str, float]] = {}
    t0 = trio.current_time()

    async def job(label: str, duration: float) -> None:
        try:
            await trio.sleep(duration)
        except trio.Cancelled:
            ended[label] = ("cancelled", trio.current_time() - t0)
            raise
        ended[label] = ("done", trio.current_time() - t0)

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(job, "default", 10.0, name="default")  # config limit: 1.5
        handle.spawn(job, "shorter", 10.0, name="shorter", timeout=0.5)  # overrides
        handle.spawn(job, "longer", 3.0, name="longer", timeout=4.0)  # overrides upward
        handle.spawn(job, "unlimited", 10.0, name="unlimited", timeout=math.inf)
        handle.spawn(job, "fast", 1.0, name="fast")
        await runtime.wait_idle()
        assert trio.current_time() - t0 == 10.0
        assert counts(runtime) == {"timed_out": 2, "completed": 3}
    assert ended == {
        "default": ("cancelled", 1.5),
        "shorter": ("cancelled", 0.5),
        "longer": ("done", 3.0),
        "unlimited": ("done", 10.0),
        "fast": ("done", 1.0),
    }
    warned = sorted(r.__dict__["job_name"] for r in records(caplog, logging.WARNING))
    assert warned == ["default", "shorter"]


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


async def test_fifo_with_one_slot(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=1)
    started: list[tuple[int, float]] = []
    t0 = trio.current_time()

    async def job(i: int) -> None:
        started.append((i, trio.current_time() - t0))
        await trio.sleep(0.25 * (i % 3))

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        for i in range(12):
            if i % 2:
                await handle.send(job, i)
            else:
                handle.spawn(job, i)
        await runtime.wait_idle()
    assert [i for i, _ in started] == list(range(12))
    expected_at = 0.0
    for i, at in started:
        assert at == expected_at
        expected_at += 0.25 * (i % 3)


async def test_send_waits_while_full_fifo(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=1, max_concurrent_tasks=1)
    started: list[str] = []
    returned: list[tuple[str, float]] = []
    t0 = trio.current_time()

    async def job(label: str) -> None:
        started.append(label)
        await trio.sleep(1)

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(job, "a")  # running until 1
        handle.spawn(job, "b")  # queued
        with pytest.raises(QueueFullError):
            handle.spawn(job, "x")

        async def sender(label: str) -> None:
            await handle.send(job, label)
            returned.append((label, trio.current_time() - t0))

        async with trio.open_nursery() as nursery:
            for label in ("c", "d", "e"):
                nursery.start_soon(sender, label)
                await trio.testing.wait_all_tasks_blocked()
            assert returned == []
            stats = runtime.statistics()
            assert (stats.running, stats.queued, stats.accepted, stats.rejected) == (1, 1, 2, 1)
        # Each waiting send was accepted the instant room appeared, in arrival order.
        assert returned == [("c", 1.0), ("d", 2.0), ("e", 3.0)]
        await runtime.wait_idle()
    assert started == ["a", "b", "c", "d", "e"]
    assert counts(runtime) == {"completed": 5, "rejected": 1}


async def test_send_with_zero_queue(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=0, max_concurrent_tasks=1)
    events: list[tuple[str, float]] = []
    t0 = trio.current_time()

    async def job(label: str) -> None:
        events.append((f"start {label}", trio.current_time() - t0))
        await trio.sleep(1.5)

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        await handle.send(job, "a")  # a slot is free: starts at once
        assert counts(runtime) == {"running": 1}
        with pytest.raises(QueueFullError):
            handle.spawn(job, "rejected")
        await handle.send(job, "b")  # waits until a's slot frees
        events.append(("send b returned", trio.current_time() - t0))
        assert counts(runtime) == {"running": 1, "completed": 1, "rejected": 1}
        await runtime.wait_idle()
    # b's first step and the return from send() happen in the same batch, in either order.
    assert events[0] == ("start a", 0.0)
    assert sorted(events[1:]) == [("send b returned", 1.5), ("start b", 1.5)]
    assert counts(runtime) == {"completed": 2, "rejected": 1}


async def test_send_is_a_checkpoint_and_cancellable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=0, max_concurrent_tasks=1)
    ran: list[str] = []

    async def job(label: str) -> None:
        ran.append(label)
        await trio.sleep(1)

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        with trio.CancelScope() as scope:
            scope.cancel()
            await handle.send(job, "cancelled-before")
        assert scope.cancelled_caught
        assert runtime.statistics().accepted == 0

        handle.spawn(job, "a")
        with trio.move_on_after(0.5) as scope:
            await handle.send(job, "cancelled-while-waiting")
        assert scope.cancelled_caught
        await runtime.wait_idle()
        assert trio.current_time() == 1.0
    assert ran == ["a"]
    assert counts(runtime) == {"completed": 1}


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


async def test_jobs_sharing_a_slot_keep_their_own_contexts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With one slot, queued jobs run one after another on the same task; each must
    # still see only its own submitter's context, and tasks it starts inherit it.
    seen: list[tuple[str, str, str]] = []

    async def job(label: str) -> None:
        before = request_var.get()
        request_var.set(f"set-by-{label}")
        child: list[str] = []

        async def read_in_child() -> None:
            child.append(request_var.get())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_in_child)
        await trio.sleep(1)
        seen.append((label, before, child[0]))

    async with open_background_runtime(BackgroundTaskConfig(max_concurrent_tasks=1)) as runtime:
        handle = runtime.handle()
        for label in ("a", "b", "c"):
            request_var.set(f"submitted-{label}")
            handle.spawn(job, label)
        request_var.set("submitter-after")
        await runtime.wait_idle()
        assert request_var.get() == "submitter-after"
    assert seen == [
        ("a", "submitted-a", "set-by-a"),
        ("b", "submitted-b", "set-by-b"),
        ("c", "submitted-c", "set-by-c"),
    ]
    assert trio.current_time() == 3
