"""One test per flaw of the seed that the contract says v1 fixes.

1. ``max_queue_size`` bounded nothing once the dispatcher moved jobs behind the semaphore.
2. Counters did not add up and could not be read.
3. On drain timeout jobs were detached instead of cancelled.
4. Spawning while draining was accepted, and "closed" was reported as "queue full".
5. The shutdown error was empty.
6. The future was built at submit time.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import pytest
import trio
import trio.testing
from helpers import check_invariants

from trio_background import (
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)


def check_identity(runtime: BackgroundRuntime, accepted_calls: int) -> None:
    """Assert the accounting identity against a count of successful calls kept by the test."""
    s = runtime.statistics()
    assert s.accepted == accepted_calls
    check_invariants(s)  # accepted == queued + running + ... + dropped, and the bounds


async def test_flaw1_queue_bound_holds_after_jobs_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=3, max_concurrent_tasks=2, drain_timeout=10.0)
    gate = trio.Event()

    async def job() -> None:
        await gate.wait()
        await trio.sleep(1)

    async def quick() -> None:
        pass

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        accepted = 0
        rejected = 0
        # Offer far more jobs than fit, yielding between offers so a dispatcher (the seed's
        # executor loop) would have every chance to move jobs out of the bounded queue.
        for _ in range(50):
            try:
                handle.spawn(job)
            except QueueFullError:
                rejected += 1
            else:
                accepted += 1
            await trio.testing.wait_all_tasks_blocked()
            stats = runtime.statistics()
            assert stats.queued <= 3
            assert stats.running <= 2
        assert (accepted, rejected) == (5, 45)
        stats = runtime.statistics()
        assert (stats.running, stats.queued, stats.rejected) == (2, 3, 45)

        # Slots saturated and queue full: rejected, every time, with no scheduling luck.
        for _ in range(3):
            with pytest.raises(QueueFullError):
                handle.spawn(quick)
        assert runtime.statistics().rejected == 48

        # When slots free up, queued jobs move into them and exactly that much room appears.
        gate.set()
        await trio.sleep(1)  # the first wave ends here; the queued ones start
        await trio.testing.wait_all_tasks_blocked()
        stats = runtime.statistics()
        assert (stats.running, stats.queued, stats.completed) == (2, 1, 2)
        handle.spawn(job)
        handle.spawn(job)
        with pytest.raises(QueueFullError):
            handle.spawn(job)
        assert runtime.statistics().queued == 3
        await runtime.wait_idle()
        stats = runtime.statistics()
        assert (stats.completed, stats.rejected, stats.accepted) == (7, 49, 7)


async def test_flaw2_counters_add_up_at_every_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(
        max_queue_size=2, max_concurrent_tasks=2, drain_timeout=2.0, job_timeout=3.0
    )
    accepted = 0
    rejected = 0

    async def ok(delay: float) -> None:
        await trio.sleep(delay)

    async def bad(delay: float) -> None:
        await trio.sleep(delay)
        raise BackgroundJobError("bad")

    async def forever() -> None:
        await trio.sleep_forever()

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        check_identity(runtime, accepted)

        script: list[tuple[Any, tuple[Any, ...]]] = [
            (ok, (1.0,)),
            (bad, (0.5,)),
            (forever, ()),  # times out after job_timeout=3
            (ok, (0.25,)),
            (bad, (0.0,)),  # rejected: both slots and the queue are taken
        ]
        for fn, args in script:
            try:
                handle.spawn(fn, *args)
            except QueueFullError:
                rejected += 1
            else:
                accepted += 1
            check_identity(runtime, accepted)
            assert runtime.statistics().rejected == rejected
        assert (accepted, rejected) == (4, 1)

        # Step through virtual time, checking the identity at every instant something happens.
        expected = {
            0.5: (1, 0, 0),  # bad(0.5) failed; forever starts
            1.0: (1, 1, 0),  # ok(1.0) completed; ok(0.25) starts
            1.25: (1, 2, 0),  # ok(0.25) completed
            3.5: (1, 2, 1),  # forever timed out (started at 0.5)
        }
        t0 = trio.current_time()
        for at, (failed, completed, timed_out) in expected.items():
            await trio.sleep_until(t0 + at)
            await trio.testing.wait_all_tasks_blocked()
            check_identity(runtime, accepted)
            s = runtime.statistics()
            assert (s.failed, s.completed, s.timed_out) == (failed, completed, timed_out)

        # Now a cut-off: two long jobs running, two queued, one more rejected.
        for _ in range(4):
            handle.spawn(ok, 100.0)
            accepted += 1
            check_identity(runtime, accepted)
        with pytest.raises(QueueFullError):
            handle.spawn(ok, 0.0)
        rejected += 1
        check_identity(runtime, accepted)
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
        check_identity(runtime, accepted)
    final = runtime.statistics()
    assert final == excinfo.value.statistics
    assert (final.queued, final.running) == (0, 0)
    assert (final.completed, final.failed, final.timed_out) == (2, 1, 1)
    assert (final.cancelled, final.dropped, final.rejected) == (2, 2, rejected)
    check_identity(runtime, accepted)


async def test_flaw3_drain_timeout_cancels_running_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=1.5)
    observed_cancel: list[tuple[int, float]] = []
    after_sleep: list[int] = []
    t0 = trio.current_time()

    async def job(i: int) -> None:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            observed_cancel.append((i, trio.current_time() - t0))
            raise
        after_sleep.append(i)

    async with open_background_runtime(config) as runtime:
        for i in range(3):
            runtime.handle().spawn(job, i)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
        # By the time aclose() raised, the cancelled jobs have really ended.
        assert sorted(observed_cancel) == [(0, 1.5), (1, 1.5)]
        assert runtime.statistics().running == 0
    # Nothing runs after the block exits, however long we wait.
    await trio.sleep(100)
    assert after_sleep == []
    assert sorted(observed_cancel) == [(0, 1.5), (1, 1.5)]
    assert len(excinfo.value.cancelled) == 2
    assert len(excinfo.value.dropped) == 1
    s = runtime.statistics()
    assert (s.cancelled, s.dropped, s.completed) == (2, 1, 0)


async def test_flaw4_closed_is_not_full(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=1, max_concurrent_tasks=1, drain_timeout=10.0)
    gate = trio.Event()
    send_result: list[BaseException | None] = []

    async def job() -> None:
        await gate.wait()

    async def quick() -> None:
        pass

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(job)
        handle.spawn(job)
        # The queue is full: this is "full".
        with pytest.raises(QueueFullError):
            handle.spawn(quick)

        async def waiting_sender() -> None:
            try:
                await handle.send(quick)
            except RuntimeClosedError as exc:
                send_result.append(exc)
            else:
                send_result.append(None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting_sender)
            await trio.testing.wait_all_tasks_blocked()
            assert send_result == []  # still waiting for room

            nursery.start_soon(runtime.aclose)
            await trio.testing.wait_all_tasks_blocked()
            # Draining has begun (the jobs are still there) and the waiting send was woken.
            stats = runtime.statistics()
            assert stats.closed
            assert (stats.running, stats.queued) == (1, 1)
            assert len(send_result) == 1
            assert isinstance(send_result[0], RuntimeClosedError)
            assert not isinstance(send_result[0], QueueFullError)

            # Queue still full, but the answer is now "closed", not "full".
            with pytest.raises(RuntimeClosedError) as excinfo:
                handle.spawn(quick)
            assert not isinstance(excinfo.value, QueueFullError)
            assert str(excinfo.value) == "background runtime is closed"
            with pytest.raises(RuntimeClosedError):
                await handle.send(quick)
            # Nothing of that counted as a rejection or an acceptance.
            stats = runtime.statistics()
            assert (stats.rejected, stats.accepted) == (1, 2)
            gate.set()
    stats = runtime.statistics()
    assert (stats.completed, stats.rejected, stats.accepted) == (2, 1, 2)


async def test_flaw5_shutdown_error_names_cut_off_jobs(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=2, drain_timeout=2.0)

    async def job(delay: float) -> None:
        await trio.sleep(delay)

    metas = [BackgroundJobMetadata(name=f"job{i}", request_id=f"req-{i}") for i in range(6)]
    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        # job0 ends at 0.5 and hands its slot to job2; job1 and job2 are running at the deadline
        # (t = 2), job3..job5 never start.
        delays = [0.5, 100.0, 100.0, 100.0, 100.0, 100.0]
        for meta, delay in zip(metas, delays, strict=True):
            handle.spawn(job, delay, name=meta.name, request_id=meta.request_id)
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
    err = excinfo.value
    assert err.cancelled == (metas[1], metas[2])
    assert err.dropped == (metas[3], metas[4], metas[5])
    assert isinstance(err.cancelled, tuple)
    assert isinstance(err.dropped, tuple)
    assert err.statistics == runtime.statistics()
    s = err.statistics
    assert (s.completed, s.cancelled, s.dropped, s.queued, s.running) == (1, 2, 3, 0, 0)
    assert s.closed
    assert str(err)  # a message, not an empty error
    warned = [
        (r.__dict__["job_name"], r.__dict__["request_id"])
        for r in caplog.records
        if r.name == "trio_background" and r.levelno == logging.WARNING and "job_name" in r.__dict__
    ]
    # One WARNING per cut-off job, naming it.
    assert sorted(warned) == [(m.name, m.request_id) for m in metas[1:]]


async def test_flaw6_no_coroutine_created_at_submit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=1, drain_timeout=1.0)
    calls: list[str] = []
    gate = trio.Event()

    def make(label: str, delay: float) -> Coroutine[Any, Any, None]:
        # Not an async def: calling it has a visible side effect.
        calls.append(label)
        return trio.sleep(delay)  # noqa: ASYNC105 (the runtime awaits it)

    async def blocker() -> None:
        await gate.wait()

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(blocker)
        await trio.testing.wait_all_tasks_blocked()
        handle.spawn(make, "first", 0.5)
        handle.spawn(make, "second", 100.0)
        handle.spawn(make, "never", 0.0)
        await trio.testing.wait_all_tasks_blocked()
        assert calls == []  # queued: not called at submit
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert calls == ["first"]  # called when (and only when) the job starts
        await trio.sleep(0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert calls == ["first", "second"]
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
    # The job dropped at shutdown was never called, so no coroutine was ever created for it.
    assert calls == ["first", "second"]
    assert [m.name for m in excinfo.value.dropped] == [make.__qualname__]
    assert [m.name for m in excinfo.value.cancelled] == [make.__qualname__]
    s = runtime.statistics()
    assert (s.completed, s.cancelled, s.dropped) == (2, 1, 1)
