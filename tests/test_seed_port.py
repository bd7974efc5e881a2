"""Port of the 53 tests of the Rust/tokio seed (``background.rs``).

Each test keeps the seed's name. Tokio sleeps that only "let things happen" became
``trio.testing.wait_all_tasks_blocked()``, ``runtime.wait_idle()`` or virtual time under the
``autojump_clock`` fixture, and assertions were tightened to exact counts and exact virtual
times wherever the contract allows it. Where the contract deliberately differs from the seed,
a one-line comment on the test says how. A bare ``await runtime.aclose()`` is the port of the
seed's ``shutdown().await.is_ok()``: it raises `BackgroundShutdownError` when jobs are cut off.
"""

from __future__ import annotations

import logging

import attrs
import pytest
import trio
import trio.testing
from helpers import counts, records

from trio_background import (
    BackgroundHandle,
    BackgroundInstrument,
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundShutdownError,
    BackgroundSpawnError,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)


class Gate:
    """A reusable "wait until released" helper for job bodies."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.waiting = 0

    async def wait(self) -> None:
        self.waiting += 1
        try:
            await self.event.wait()
        finally:
            self.waiting -= 1

    def open(self) -> None:
        self.event.set()


class Barrier:
    """An n-party barrier (the seed's ``tokio::sync::Barrier``)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.event = trio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.event.set()
        await self.event.wait()


class Recorder(BackgroundInstrument):
    """Instrument recording (hook, metadata) pairs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, BackgroundJobMetadata]] = []
        self.outcomes: list[tuple[BackgroundJobMetadata, str, float]] = []

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.events.append(("accepted", job))

    def job_started(self, job: BackgroundJobMetadata) -> None:
        self.events.append(("started", job))

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.events.append(("finished", job))
        self.outcomes.append((job, outcome, duration))


def saturate(handle: BackgroundHandle, slots: int, gate: Gate) -> None:
    """Fill every slot with a job that waits on ``gate``."""
    for _ in range(slots):
        handle.spawn(gate.wait)


async def test_basic_spawn_and_execution(autojump_clock: trio.testing.MockClock) -> None:
    counter = 0

    async def job() -> None:
        nonlocal counter
        counter += 1

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        handle = runtime.handle()
        handle.spawn(job)
        # A free slot and an empty queue: the job counts as running at once.
        assert counts(runtime) == {"running": 1}
        await runtime.wait_idle()
        assert counter == 1
        assert counts(runtime) == {"completed": 1}
        await runtime.aclose()
    assert runtime.statistics().closed


async def test_multiple_tasks(autojump_clock: trio.testing.MockClock) -> None:
    counter = 0

    async def job() -> None:
        nonlocal counter
        counter += 1

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        handle = runtime.handle()
        for _ in range(10):
            handle.spawn(job)
        assert counts(runtime) == {"running": 10}
        await runtime.wait_idle()
        assert counter == 10
        assert counts(runtime) == {"completed": 10}
        assert runtime.statistics().accepted == 10


async def test_task_with_metadata(autojump_clock: trio.testing.MockClock) -> None:
    # spawn_with_metadata becomes spawn(fn, name=..., request_id=...).
    counter = 0
    recorder = Recorder()

    async def job() -> None:
        nonlocal counter
        counter += 1

    async with open_background_runtime(BackgroundTaskConfig(), instruments=[recorder]) as runtime:
        runtime.handle().spawn(job, name="test_task", request_id="req-123")
        await runtime.wait_idle()
        assert counter == 1
        assert counts(runtime) == {"completed": 1}
    meta = BackgroundJobMetadata(name="test_task", request_id="req-123")
    assert recorder.events == [("accepted", meta), ("started", meta), ("finished", meta)]


async def test_queue_full_error(autojump_clock: trio.testing.MockClock) -> None:
    # Run with the 10 slots saturated: our spawn starts a job at once when a slot is free.
    config = BackgroundTaskConfig(max_queue_size=2, max_concurrent_tasks=10, drain_timeout=5.0)
    gate = Gate()
    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        saturate(handle, 10, gate)
        for _ in range(2):
            handle.spawn(gate.wait)
        assert counts(runtime) == {"running": 10, "queued": 2}

        async def never() -> None:
            raise AssertionError("a rejected job must never run")

        with pytest.raises(QueueFullError, match=r"^background task queue is full$"):
            handle.spawn(never)
        assert counts(runtime) == {"running": 10, "queued": 2, "rejected": 1}

        gate.open()
        await runtime.wait_idle()
        assert counts(runtime) == {"completed": 12, "rejected": 1}
        await runtime.aclose()


async def test_task_failure_handling(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    success_count = 0

    async def job() -> None:
        nonlocal success_count
        success_count += 1
        raise BackgroundJobError("test error")

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        runtime.handle().spawn(job, name="failing")
        await runtime.wait_idle()
        assert success_count == 1
        assert counts(runtime) == {"failed": 1}
        # A failed job does not make the shutdown fail.
        await runtime.aclose()
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1
    assert errors[0].__dict__["job_name"] == "failing"
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], BackgroundJobError)


async def test_concurrency_limit_with_proper_synchronization(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=2, drain_timeout=30.0)
    running = 0
    max_concurrent = 0
    t0 = trio.current_time()

    async with open_background_runtime(config) as runtime:

        async def job() -> None:
            nonlocal running, max_concurrent
            running += 1
            max_concurrent = max(max_concurrent, running)
            assert runtime.statistics().running <= 2
            await trio.sleep(1.0)
            running -= 1

        for _ in range(5):
            runtime.handle().spawn(job)
        assert counts(runtime) == {"running": 2, "queued": 3}
        await runtime.wait_idle()
        # Three waves of (at most) two one-second jobs.
        assert trio.current_time() - t0 == 3.0
        assert max_concurrent == 2
        assert counts(runtime) == {"completed": 5}


async def test_graceful_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=5.0)
    counter = 0

    async def job() -> None:
        nonlocal counter
        await trio.sleep(0.5)
        counter += 1

    t0 = trio.current_time()
    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job)
        await runtime.wait_idle()
        assert trio.current_time() - t0 == 0.5
        await runtime.aclose()
        assert counter == 1
        assert counts(runtime) == {"completed": 1}
        assert runtime.statistics().closed


async def test_shutdown_timeout(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=1.0)

    async def job() -> None:
        await trio.sleep(5)

    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job, name="sleepy")
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
        assert trio.current_time() - t0 == 1.0
    assert excinfo.value.cancelled == (BackgroundJobMetadata(name="sleepy"),)
    assert excinfo.value.dropped == ()
    assert counts(runtime) == {"cancelled": 1}
    assert excinfo.value.statistics == runtime.statistics()


async def test_metrics_tracking(autojump_clock: trio.testing.MockClock) -> None:
    # The seed's private metrics become runtime.statistics().
    barrier = Barrier(2)
    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        stats = runtime.statistics()
        assert (stats.max_queue_size, stats.max_concurrent_tasks) == (1024, 128)
        assert counts(runtime) == {}
        assert stats.accepted == 0
        assert not stats.closed
        for _ in range(2):
            runtime.handle().spawn(barrier.wait)
        assert counts(runtime) == {"running": 2}
        assert runtime.statistics().accepted == 2
        await runtime.wait_idle()
        assert counts(runtime) == {"completed": 2}
        await runtime.aclose()
        assert runtime.statistics().closed


async def test_task_cancellation_on_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=1.0)
    started = 0
    completed = 0
    saw_cancelled = False

    async def job() -> None:
        nonlocal started, completed, saw_cancelled
        started += 1
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            saw_cancelled = True
            raise
        completed += 1

    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job)
        await trio.testing.wait_all_tasks_blocked()
        assert started == 1
        t0 = trio.current_time()
        with pytest.raises(BackgroundShutdownError):
            await runtime.aclose()
        # Virtual time instead of the seed's "< 3 s of wall time".
        assert trio.current_time() - t0 == 1.0
    assert saw_cancelled
    assert completed == 0
    assert counts(runtime) == {"cancelled": 1}


async def test_queue_overflow_multiple_spawns(autojump_clock: trio.testing.MockClock) -> None:
    # Run with the 10 slots saturated: our spawn starts a job at once when a slot is free.
    config = BackgroundTaskConfig(max_queue_size=3, max_concurrent_tasks=10, drain_timeout=5.0)
    gate = Gate()

    async def job() -> None:
        await gate.wait()
        await trio.sleep(0.1)

    async def quick() -> None:
        pass

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        for _ in range(13):
            handle.spawn(job)
        assert counts(runtime) == {"running": 10, "queued": 3}
        with pytest.raises(QueueFullError):
            handle.spawn(quick)
        assert counts(runtime) == {"running": 10, "queued": 3, "rejected": 1}

        gate.open()
        await runtime.wait_idle()
        handle.spawn(quick)
        await runtime.wait_idle()
        assert counts(runtime) == {"completed": 14, "rejected": 1}
        await runtime.aclose()


async def test_concurrent_task_execution_order(autojump_clock: trio.testing.MockClock) -> None:
    order: list[int] = []
    start_times: list[float] = []
    t0 = trio.current_time()

    async def job(i: int) -> None:
        start_times.append(trio.current_time())
        order.append(i)

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        for i in range(5):
            runtime.handle().spawn(job, i)
        await runtime.wait_idle()
    # Jobs that start at the same instant may run their first step in any order.
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert start_times == [t0] * 5
    assert counts(runtime) == {"completed": 5}


async def test_error_from_string_conversion() -> None:
    error = BackgroundJobError("test message")
    assert error.message == "test message"
    assert str(error) == "test message"

    error2 = BackgroundJobError("test")
    assert error2.message == "test"
    assert isinstance(error2, Exception)


async def test_background_job_metadata_default() -> None:
    metadata = BackgroundJobMetadata()
    assert metadata.name == "background_task"
    assert metadata.request_id is None
    assert metadata == BackgroundJobMetadata(name="background_task", request_id=None)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        metadata.name = "other"  # type: ignore[misc]


async def test_background_job_metadata_custom() -> None:
    metadata = BackgroundJobMetadata(name="custom_task", request_id="req-456")
    assert metadata.name == "custom_task"
    assert metadata.request_id == "req-456"
    assert metadata == BackgroundJobMetadata(name="custom_task", request_id="req-456")
    assert metadata != BackgroundJobMetadata(name="custom_task", request_id="req-457")
    assert hash(metadata) == hash(BackgroundJobMetadata(name="custom_task", request_id="req-456"))


async def test_metrics_inc_dec_operations(autojump_clock: trio.testing.MockClock) -> None:
    # The seed pokes private inc/dec counters; we drive the same moves through real jobs.
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=1)
    gates = [Gate() for _ in range(3)]

    async def job(i: int) -> None:
        await gates[i].wait()
        if i == 1:
            raise BackgroundJobError("boom")
        if i == 2:
            raise ValueError("boom again")

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(job, 0)
        assert counts(runtime) == {"running": 1}
        handle.spawn(job, 1)
        assert counts(runtime) == {"running": 1, "queued": 1}
        handle.spawn(job, 2)
        assert counts(runtime) == {"running": 1, "queued": 2}

        gates[0].open()
        await trio.testing.wait_all_tasks_blocked()
        assert counts(runtime) == {"running": 1, "queued": 1, "completed": 1}

        gates[1].open()
        await trio.testing.wait_all_tasks_blocked()
        assert counts(runtime) == {"running": 1, "completed": 1, "failed": 1}

        gates[2].open()
        await runtime.wait_idle()
        assert counts(runtime) == {"completed": 1, "failed": 2}
        assert runtime.statistics().accepted == 3


async def test_spawn_error_display() -> None:
    error = QueueFullError()
    assert str(error) == "background task queue is full"
    assert isinstance(error, BackgroundSpawnError)


async def test_background_config_default() -> None:
    config = BackgroundTaskConfig()
    assert config.max_queue_size == 1024
    assert config.max_concurrent_tasks == 128
    assert config.drain_timeout == 30.0
    assert config.job_timeout is None
    assert config == BackgroundTaskConfig(
        max_queue_size=1024, max_concurrent_tasks=128, drain_timeout=30.0, job_timeout=None
    )
    async with open_background_runtime() as runtime:
        stats = runtime.statistics()
        assert stats.max_queue_size == 1024
        assert stats.max_concurrent_tasks == 128


async def test_shutdown_with_zero_pending_tasks(autojump_clock: trio.testing.MockClock) -> None:
    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() == t0
        assert counts(runtime) == {}
        assert runtime.statistics().closed


async def test_shutdown_with_only_running_tasks(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=5.0)
    started = False
    completed = False

    async def job() -> None:
        nonlocal started, completed
        started = True
        await trio.sleep(1.0)
        completed = True

    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job)
        await trio.testing.wait_all_tasks_blocked()
        assert started
        assert counts(runtime) == {"running": 1}
        t0 = trio.current_time()
        await runtime.aclose()
        # aclose waited for the running job, and no longer.
        assert trio.current_time() - t0 == 1.0
        assert completed
        assert counts(runtime) == {"completed": 1}


async def test_shutdown_drains_queued_tasks(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=1, drain_timeout=5.0)
    executed: list[int] = []

    async def job(i: int) -> None:
        executed.append(i)
        await trio.sleep(0.125)

    async with open_background_runtime(config) as runtime:
        for i in range(10):
            runtime.handle().spawn(job, i)
        assert counts(runtime) == {"running": 1, "queued": 9}
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() - t0 == 1.25
    assert executed == list(range(10))
    assert counts(runtime) == {"completed": 10}


async def test_shutdown_timeout_force_stops_long_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=1.0)
    completed = False

    async def job() -> None:
        nonlocal completed
        await trio.sleep(10)
        completed = True

    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        with pytest.raises(BackgroundShutdownError):
            await runtime.aclose()
        assert trio.current_time() - t0 == 1.0
    # Cancelled, not detached: even much later the job never completes.
    await trio.sleep(20)
    assert not completed
    assert counts(runtime) == {"cancelled": 1}


async def test_multiple_shutdown_calls_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        await runtime.aclose()
        await runtime.aclose()
        assert counts(runtime) == {}
    # Leaving the block called aclose() a third time; still fine.
    await runtime.aclose()
    assert runtime.statistics().closed


async def test_spawn_after_all_senders_dropped_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # "Senders dropped" becomes RuntimeClosedError after aclose (not QueueFullError).
    called = False

    async def job() -> None:
        nonlocal called
        called = True

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        handle = runtime.handle()
        await runtime.aclose()
        with pytest.raises(RuntimeClosedError, match=r"^background runtime is closed$"):
            handle.spawn(job)
        with pytest.raises(RuntimeClosedError):
            await handle.send(job)
        with pytest.raises(RuntimeClosedError):
            runtime.handle().spawn(job)
    with pytest.raises(RuntimeClosedError):
        handle.spawn(job)
    assert not called
    assert counts(runtime) == {}
    assert runtime.statistics().accepted == 0


async def test_concurrent_spawns_hit_semaphore_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=3, drain_timeout=10.0)
    gate = Gate()
    running = 0
    peak = 0

    async def job() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        await trio.sleep(0.2)
        running -= 1

    async with open_background_runtime(config) as runtime:
        for _ in range(5):
            runtime.handle().spawn(job)
        await trio.testing.wait_all_tasks_blocked()
        assert gate.waiting == 3
        assert counts(runtime) == {"running": 3, "queued": 2}
        gate.open()
        await runtime.wait_idle()
        assert peak == 3
        assert counts(runtime) == {"completed": 5}


async def test_task_panic_cleanup_still_occurs(autojump_clock: trio.testing.MockClock) -> None:
    # A Rust panic is a plain Exception here: counted failed, nothing else disturbed.
    spawned_count = 0
    panic_executed = False
    after_panic_executed = False

    async def panics() -> None:
        nonlocal panic_executed
        panic_executed = True
        raise RuntimeError("simulated task failure")

    async def after() -> None:
        nonlocal after_panic_executed
        await trio.sleep(0.05)
        after_panic_executed = True

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        runtime.handle().spawn(panics)
        spawned_count += 1
        runtime.handle().spawn(after)
        spawned_count += 1
        await runtime.wait_idle()
        assert panic_executed
        assert after_panic_executed
        assert spawned_count == runtime.statistics().accepted == 2
        assert counts(runtime) == {"failed": 1, "completed": 1}
        await runtime.aclose()


async def test_queue_overflow_with_immediate_rejection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Run with the 100 slots saturated: our spawn starts a job at once when a slot is free.
    config = BackgroundTaskConfig(max_queue_size=2, max_concurrent_tasks=100, drain_timeout=5.0)
    gate = Gate()

    async def job() -> None:
        await gate.wait()
        await trio.sleep(0.5)

    async def quick() -> None:
        pass

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        for _ in range(102):
            handle.spawn(job)
        # Rejected synchronously, without the test ever yielding.
        with pytest.raises(QueueFullError):
            handle.spawn(quick)
        assert counts(runtime) == {"running": 100, "queued": 2, "rejected": 1}
        gate.open()
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() - t0 == 1.0
        assert counts(runtime) == {"completed": 102, "rejected": 1}


async def test_metrics_accuracy_under_concurrent_load(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=50, max_concurrent_tasks=5, drain_timeout=10.0)
    completed = 0

    async def job() -> None:
        nonlocal completed
        await trio.sleep(0.5)
        completed += 1

    async with open_background_runtime(config) as runtime:
        for _ in range(20):
            runtime.handle().spawn(job)
        assert counts(runtime) == {"running": 5, "queued": 15}
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() - t0 == 2.0
    assert completed == 20
    assert counts(runtime) == {"completed": 20}
    assert runtime.statistics().accepted == 20


async def test_drain_with_slowly_completing_tasks(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=50, max_concurrent_tasks=2, drain_timeout=10.0)
    finished_at: dict[int, float] = {}
    t0 = trio.current_time()

    async def job(i: int) -> None:
        await trio.sleep(1.0 + 0.5 * i)
        finished_at[i] = trio.current_time() - t0

    async with open_background_runtime(config) as runtime:
        for i in range(5):
            runtime.handle().spawn(job, i)
        await runtime.aclose()
    # Slots: 0 [0, 1], 1 [0, 1.5], 2 [1, 3], 3 [1.5, 4], 4 [3, 6].
    assert finished_at == {0: 1.0, 1: 1.5, 2: 3.0, 3: 4.0, 4: 6.0}
    assert counts(runtime) == {"completed": 5}


async def test_semaphore_starvation_doesnt_deadlock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=1, drain_timeout=10.0)
    completion_order: list[int] = []

    async def job(i: int) -> None:
        await trio.sleep(0.25)
        completion_order.append(i)

    t0 = trio.current_time()
    async with open_background_runtime(config) as runtime:
        for i in range(10):
            runtime.handle().spawn(job, i)
        await runtime.aclose()
    # One slot: strictly one after another, in acceptance order.
    assert completion_order == list(range(10))
    assert trio.current_time() - t0 == 2.5


async def test_cancel_task_mid_execution(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=1.0)
    started = False
    ended = False

    async def job() -> None:
        nonlocal started, ended
        started = True
        await trio.sleep(10)
        ended = True

    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job, name="mid", request_id="r-1")
        await trio.testing.wait_all_tasks_blocked()
        assert started
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
    assert not ended
    assert excinfo.value.cancelled == (BackgroundJobMetadata(name="mid", request_id="r-1"),)
    assert counts(runtime) == {"cancelled": 1}


async def test_rapid_spawn_and_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=1000, max_concurrent_tasks=10, drain_timeout=5.0)
    count = 0

    async def job() -> None:
        nonlocal count
        count += 1

    async with open_background_runtime(config) as runtime:
        for _ in range(100):
            runtime.handle().spawn(job)
        assert counts(runtime) == {"running": 10, "queued": 90}
        await runtime.aclose()
    # Strengthened from the seed's "0 < count <= 100": draining runs every accepted job.
    assert count == 100
    assert counts(runtime) == {"completed": 100}


async def test_shutdown_with_mixed_success_and_failure_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    success_count = 0
    failure_count = 0

    async def succeed() -> None:
        nonlocal success_count
        success_count += 1

    async def fail() -> None:
        nonlocal failure_count
        failure_count += 1
        raise BackgroundJobError("intentional failure")

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        for i in range(10):
            runtime.handle().spawn(succeed if i % 2 == 0 else fail)
        await runtime.wait_idle()
        await runtime.aclose()
    assert success_count == 5
    assert failure_count == 5
    assert counts(runtime) == {"completed": 5, "failed": 5}


async def test_concurrent_handle_clones_spawn_independently(
    autojump_clock: trio.testing.MockClock,
) -> None:
    count = 0

    async def job() -> None:
        nonlocal count
        count += 1

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:

        async def submitter(handle: BackgroundHandle) -> None:
            for _ in range(5):
                handle.spawn(job)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(submitter, runtime.handle())
        await runtime.wait_idle()
        await runtime.aclose()
    assert count == 15
    assert counts(runtime) == {"completed": 15}


async def test_queue_full_metrics_updated(autojump_clock: trio.testing.MockClock) -> None:
    # Run with the 100 slots saturated; "metrics updated" is now checked on statistics().
    config = BackgroundTaskConfig(max_queue_size=2, max_concurrent_tasks=100, drain_timeout=5.0)
    gate = Gate()

    async def job() -> None:
        await gate.wait()
        await trio.sleep(1)

    async def quick() -> None:
        pass

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        for _ in range(102):
            handle.spawn(job)
        before = runtime.statistics()
        with pytest.raises(QueueFullError):
            handle.spawn(quick)
        after = runtime.statistics()
        assert after.rejected == before.rejected + 1 == 1
        assert after.accepted == before.accepted == 102
        assert after.queued == after.max_queue_size == 2
        assert after.running == after.max_concurrent_tasks == 100
        gate.open()
        await runtime.wait_idle()
        assert counts(runtime) == {"completed": 102, "rejected": 1}
        await runtime.aclose()


async def test_handle_persistence_across_spawns(autojump_clock: trio.testing.MockClock) -> None:
    count = 0

    async def job() -> None:
        nonlocal count
        count += 1

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:
        handle = runtime.handle()
        for _ in range(5):
            handle.spawn(job)
            await trio.testing.wait_all_tasks_blocked()
        assert count == 5
        assert counts(runtime) == {"completed": 5}


async def test_shutdown_with_queue_at_capacity(autojump_clock: trio.testing.MockClock) -> None:
    # "At capacity" now means one running job plus a full queue of 5 (6 jobs, not the seed's 5).
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=10.0)
    completion_count = 0

    async def job() -> None:
        nonlocal completion_count
        await trio.sleep(0.25)
        completion_count += 1

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        for _ in range(6):
            handle.spawn(job)
        assert counts(runtime) == {"running": 1, "queued": 5}
        with pytest.raises(QueueFullError):
            handle.spawn(job)
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() - t0 == 1.5
    assert completion_count == 6
    assert counts(runtime) == {"completed": 6, "rejected": 1}


async def test_metadata_preserved_through_execution(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # spawn_with_metadata becomes spawn(fn, name=..., request_id=...); checked via an instrument
    # and the failure log record.
    recorder = Recorder()
    executed = False

    async def job() -> None:
        nonlocal executed
        executed = True

    async def failing() -> None:
        raise BackgroundJobError("nope")

    async with open_background_runtime(BackgroundTaskConfig(), instruments=[recorder]) as runtime:
        handle = runtime.handle()
        handle.spawn(job, name="test_metadata_task", request_id="req-metadata-123")
        await runtime.wait_idle()
        assert executed
        handle.spawn(failing, name="failing_task", request_id="req-metadata-456")
        await runtime.wait_idle()
        await runtime.aclose()
    meta = BackgroundJobMetadata(name="test_metadata_task", request_id="req-metadata-123")
    meta2 = BackgroundJobMetadata(name="failing_task", request_id="req-metadata-456")
    assert recorder.outcomes == [(meta, "completed", 0.0), (meta2, "failed", 0.0)]
    [record] = [r for r in caplog.records if r.name == "trio_background"]
    assert record.levelno == logging.ERROR
    assert record.__dict__["job_name"] == "failing_task"
    assert record.__dict__["request_id"] == "req-metadata-456"


async def test_very_short_drain_timeout_forces_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=0.0)

    async def job() -> None:
        await trio.sleep(1)

    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(job)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
        assert trio.current_time() == t0
    assert len(excinfo.value.cancelled) == 1
    assert counts(runtime) == {"cancelled": 1}


async def test_spawn_many_tasks_sequential_drain(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=200, max_concurrent_tasks=2, drain_timeout=15.0)
    count = 0

    async def job() -> None:
        nonlocal count
        await trio.sleep(0.125)
        count += 1

    async with open_background_runtime(config) as runtime:
        for _ in range(50):
            runtime.handle().spawn(job)
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() - t0 == 25 * 0.125
    assert count == 50
    assert counts(runtime) == {"completed": 50}


async def test_no_deadlock_with_max_concurrency_barrier(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=3, drain_timeout=10.0)
    barrier = Barrier(4)

    async def job() -> None:
        await barrier.wait()
        await trio.sleep(0.05)

    async with open_background_runtime(config) as runtime:
        for _ in range(3):
            runtime.handle().spawn(job)
        await barrier.wait()
        await runtime.aclose()
    assert counts(runtime) == {"completed": 3}


async def test_error_from_owned_string() -> None:
    # Python has no owned/borrowed split: a string built at run time stands in for String.
    message = " ".join(["error", "message"])
    error = BackgroundJobError(message)
    assert error.message == "error message"


async def test_borrowed_str_conversion() -> None:
    error = BackgroundJobError("borrowed message")
    assert error.message == "borrowed message"


async def test_phase1_semaphore_acquisition_with_concurrent_load(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=50, max_concurrent_tasks=1, drain_timeout=10.0)
    gate = Gate()
    execution_count = 0

    async def blocker() -> None:
        await gate.wait()
        await trio.sleep(0.1)

    async def job() -> None:
        nonlocal execution_count
        execution_count += 1

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(blocker)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            handle.spawn(job)
        await trio.testing.wait_all_tasks_blocked()
        assert execution_count == 0
        assert counts(runtime) == {"running": 1, "queued": 3}
        gate.open()
        await runtime.wait_idle()
        assert execution_count == 3
        assert counts(runtime) == {"completed": 4}
        await runtime.aclose()


async def test_concurrent_task_completion_race_conditions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=8, drain_timeout=10.0)
    completed = 0
    running = 0
    peak = 0

    async def job(i: int) -> None:
        nonlocal completed, running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(((i * 11) % 100) / 1000)
        running -= 1
        completed += 1

    async with open_background_runtime(config) as runtime:
        for i in range(50):
            runtime.handle().spawn(job, i)
        await runtime.aclose()
    assert completed == 50, "all tasks should complete despite race conditions"
    assert peak == 8
    assert counts(runtime) == {"completed": 50}


async def test_failure_metric_tracking_under_concurrent_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=50, max_concurrent_tasks=5, drain_timeout=10.0)
    success_count = 0
    failure_count = 0

    async def succeed() -> None:
        nonlocal success_count
        success_count += 1

    async def fail() -> None:
        nonlocal failure_count
        failure_count += 1
        raise BackgroundJobError("intentional failure")

    async with open_background_runtime(config) as runtime:
        for i in range(20):
            runtime.handle().spawn(fail if i % 3 == 0 else succeed)
        await runtime.aclose()
    assert success_count + failure_count == 20
    assert failure_count == 7
    assert success_count == 13
    assert counts(runtime) == {"completed": 13, "failed": 7}


async def test_handle_clone_isolation_concurrent_spawns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=4, drain_timeout=10.0)
    completions = [0] * 5

    async def job(worker_id: int, task_id: int) -> None:
        await trio.sleep(((worker_id * 10 + task_id) % 50) / 1000)
        completions[worker_id] += 1

    async with open_background_runtime(config) as runtime:

        async def worker(worker_id: int, handle: BackgroundHandle) -> None:
            for task_id in range(10):
                handle.spawn(job, worker_id, task_id)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for worker_id in range(5):
                nursery.start_soon(worker, worker_id, runtime.handle())
        await runtime.aclose()
    assert completions == [10] * 5
    assert counts(runtime) == {"completed": 50}


async def test_background_job_error_with_string_slice() -> None:
    errors = [BackgroundJobError("simple error"), BackgroundJobError("owned string error")]
    for error in errors:
        assert error.message
        assert isinstance(error, Exception)
    assert [e.message for e in errors] == ["simple error", "owned string error"]


async def test_spawn_error_display_formatting() -> None:
    error = QueueFullError()
    assert f"{error}" == "background task queue is full"
    with pytest.raises(BackgroundSpawnError, match=r"^background task queue is full$"):
        raise error


async def test_background_metrics_concurrent_increments(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The seed hammers private atomics from 10 tasks; here 10 tasks submit 10 failing jobs each
    # and statistics() must come out exact.
    async def fail() -> None:
        await trio.lowlevel.checkpoint()
        raise BackgroundJobError("counted")

    async with open_background_runtime(BackgroundTaskConfig()) as runtime:

        async def submitter() -> None:
            for _ in range(10):
                runtime.handle().spawn(fail)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(submitter)
        await runtime.wait_idle()
        assert counts(runtime) == {"failed": 100}
        assert runtime.statistics().accepted == 100


async def test_drain_phase_execution_with_lingering_senders(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=20, max_concurrent_tasks=2, drain_timeout=10.0)
    executed = 0

    async def job() -> None:
        nonlocal executed
        await trio.sleep(0.125)
        executed += 1

    async with open_background_runtime(config) as runtime:
        lingering = runtime.handle()
        for _ in range(5):
            lingering.spawn(job)
        t0 = trio.current_time()
        await runtime.aclose()
        # No 100 x 10 ms polling floor: done the instant the last job ends.
        assert trio.current_time() - t0 == 3 * 0.125
        # The lingering handle no longer accepts anything.
        with pytest.raises(RuntimeClosedError):
            lingering.spawn(job)
    assert executed == 5
    assert counts(runtime) == {"completed": 5}


async def test_concurrent_queue_status_transitions(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=10.0)
    transitions: list[tuple[str, int, float]] = []
    t0 = trio.current_time()

    async def job(i: int) -> None:
        transitions.append(("spawned", i, trio.current_time() - t0))
        await trio.sleep(0.5)
        transitions.append(("completed", i, trio.current_time() - t0))

    async with open_background_runtime(config) as runtime:
        for i in range(10):
            runtime.handle().spawn(job, i)
        assert counts(runtime) == {"running": 2, "queued": 8}
        await trio.testing.wait_all_tasks_blocked()
        assert counts(runtime) == {"running": 2, "queued": 8}
        await runtime.aclose()
    completed = [t for t in transitions if t[0] == "completed"]
    assert len(completed) == 10, "all tasks should complete"
    # Five waves of two, each job starting exactly when its wave begins.
    started = {i: at for (what, i, at) in transitions if what == "spawned"}
    assert started == {i: 0.5 * (i // 2) for i in range(10)}
    assert counts(runtime) == {"completed": 10}


async def test_semaphore_no_starvation_with_uneven_task_duration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=2, drain_timeout=10.0)
    fast_executed = 0
    slow_executed = 0
    t0 = trio.current_time()

    async def slow() -> None:
        nonlocal slow_executed
        await trio.sleep(1.0)
        slow_executed += 1

    async def fast() -> None:
        nonlocal fast_executed
        await trio.sleep(0.125)
        fast_executed += 1

    async with open_background_runtime(config) as runtime:
        for _ in range(5):
            runtime.handle().spawn(slow)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(5):
            runtime.handle().spawn(fast)
        await runtime.aclose()
        # Slots: slow 0-1 | slow 1-2 | slow 4 at 2-3 alongside the five fast ones at 2-2.625.
        assert trio.current_time() - t0 == 3.0
    assert fast_executed == 5, "fast tasks should not be starved"
    assert slow_executed == 5, "slow tasks should execute"
    assert counts(runtime) == {"completed": 10}
