"""The fault matrix: one test per row, each asserting exact counters and the exact report.

The rows (and what each asserts) are tabulated in ``docs/reliability.rst``.
Virtual time comes from the ``autojump_clock`` fixture except where a row is
about real threads or real time.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any, cast

import pytest
import trio
import trio.testing
from helpers import LOGGER, Recorder, all_counts, expected, records, sleeper

from trio_background import (
    BackgroundHandle,
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


def job_names(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return sorted(str(r.__dict__["job_name"]) for r in records(caplog, level))


def exc_of(record: logging.LogRecord) -> BaseException:
    assert record.exc_info is not None
    exc = record.exc_info[1]
    assert exc is not None
    return exc


def meta(name: str, request_id: str | None = None) -> BackgroundJobMetadata:
    return BackgroundJobMetadata(name=name, request_id=request_id)


@pytest.fixture(autouse=True)
def _capture_runtime_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)


# -- row 1-3: a job raises -------------------------------------------------------------------


async def test_job_raises_exception(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    boom = ValueError("boom")
    recorder = Recorder()

    async def fails() -> None:
        await trio.sleep(1)
        raise boom

    async with open_background_runtime(instruments=[recorder]) as runtime:
        handle = runtime.handle()
        handle.spawn(fails, name="fails", request_id="r-1")
        handle.spawn(sleeper, 2.0, name="bystander")
        await runtime.wait_idle()
        assert trio.current_time() == 2.0
    assert all_counts(runtime.statistics()) == expected(completed=1, failed=1)
    [error] = records(caplog, logging.ERROR)
    assert exc_of(error) is boom
    assert error.__dict__["job_name"] == "fails"
    assert error.__dict__["request_id"] == "r-1"
    assert records(caplog, logging.WARNING) == []
    assert recorder.of("finished") == [
        ("finished", "fails", "failed", 1.0),
        ("finished", "bystander", "completed", 2.0),
    ]


async def test_job_raises_background_job_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    failure = BackgroundJobError("upstream said no")
    assert failure.message == "upstream said no"

    async def fails() -> None:
        raise failure

    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        handle.spawn(fails, request_id="r-2")
        handle.spawn(sleeper, 1.0)
    assert all_counts(runtime.statistics()) == expected(completed=1, failed=1)
    [error] = records(caplog, logging.ERROR)
    assert exc_of(error) is failure
    # The default name is the function's __qualname__.
    assert error.__dict__["job_name"] == fails.__qualname__
    assert error.__dict__["request_id"] == "r-2"
    assert records(caplog, logging.WARNING) == []


async def test_job_raises_exception_group(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def raise_now(exc: Exception) -> None:
        raise exc  # in the task's first step, before any checkpoint: both raise

    async def fails_twice() -> None:
        await trio.sleep(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raise_now, KeyError("a"))
            nursery.start_soon(raise_now, OSError("b"))

    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        handle.spawn(fails_twice, name="group")
        handle.spawn(sleeper, 3.0, name="bystander")
    assert trio.current_time() == 3.0
    assert all_counts(runtime.statistics()) == expected(completed=1, failed=1)
    [error] = records(caplog, logging.ERROR)
    group = exc_of(error)
    assert isinstance(group, Exception)
    assert type(group).__name__ == "ExceptionGroup"
    inner = cast(Any, group).exceptions
    assert sorted(type(e).__name__ for e in inner) == ["KeyError", "OSError"]
    assert error.__dict__["job_name"] == "group"
    assert records(caplog, logging.WARNING) == []


# -- row 4-5: KeyboardInterrupt / SystemExit ------------------------------------------------


@pytest.mark.parametrize("phase", ["body", "drain"])
@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit"])
async def test_job_raises_keyboard_interrupt_or_system_exit(
    kind: str,
    phase: str,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fatal: BaseException = KeyboardInterrupt() if kind == "KeyboardInterrupt" else SystemExit(3)
    recorder = Recorder()
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=2, drain_timeout=50.0)

    async def dies() -> None:
        await trio.sleep(1)
        raise fatal

    opened: list[BackgroundRuntime] = []

    async def scenario() -> None:
        async with open_background_runtime(config, instruments=[recorder]) as runtime:
            opened.append(runtime)
            handle = runtime.handle()
            handle.spawn(trio.sleep_forever, name="a")
            handle.spawn(dies, name="dies")
            handle.spawn(trio.sleep_forever, name="c")
            handle.spawn(trio.sleep_forever, name="d")
            if phase == "body":
                await trio.sleep(100)  # cancelled by the runtime at t=1

    with pytest.raises(BaseException) as excinfo:  # noqa: PT011 (checked exactly below)
        await scenario()
    # The very exception, bare: not wrapped in an ExceptionGroup.
    assert excinfo.value is fatal
    assert trio.current_time() == 1.0
    [runtime] = opened
    final = runtime.statistics()
    assert final.closed
    assert all_counts(final) == expected(failed=1, cancelled=1, dropped=2)
    assert final.accepted == 4
    assert sorted(recorder.of("finished")) == [
        ("finished", "a", "cancelled", 1.0),
        ("finished", "dies", "failed", 1.0),
    ]
    assert recorder.of("dropped") == [
        ("dropped", "c", None, None),
        ("dropped", "d", None, None),
    ]
    # Everything cut off is reported: one WARNING per cancelled or dropped job.
    assert job_names(caplog, logging.WARNING) == ["a", "c", "d"]


# -- row 6: a job shields itself past the drain deadline ------------------------------------


async def test_job_shielded_past_drain_deadline(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=2, drain_timeout=5.0)
    midway: list[BackgroundStatistics] = []
    opened: list[BackgroundRuntime] = []

    async def stubborn() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(10)
            midway.append(opened[0].statistics())
            await trio.sleep(10)
        # returns normally at t=20, long after the cut-off at t=5

    async def scenario() -> None:
        async with open_background_runtime(config, instruments=[recorder]) as runtime:
            opened.append(runtime)
            handle = runtime.handle()
            handle.spawn(stubborn, name="stubborn", request_id="r-s")
            handle.spawn(sleeper, 1.0, name="quick")
            handle.spawn(sleeper, 10.0, name="late")  # starts at t=1 when quick ends
            handle.spawn(sleeper, 1.0, name="never")  # still queued at t=5

    with pytest.raises(BackgroundShutdownError) as excinfo:
        await scenario()
    [runtime] = opened
    # Shutdown waited for the shielded job to really end.
    assert trio.current_time() == 20.0
    # At t=10 the shielded job was still running, the others were already settled.
    [mid] = midway
    assert all_counts(mid) == expected(running=1, completed=1, cancelled=1, dropped=1)
    final = runtime.statistics()
    assert all_counts(final) == expected(completed=1, cancelled=2, dropped=1)
    error = excinfo.value
    assert error.cancelled == (meta("stubborn", "r-s"), meta("late"))
    assert error.dropped == (meta("never"),)
    assert error.statistics == final
    assert str(error)
    assert sorted(recorder.of("finished")) == [
        ("finished", "late", "cancelled", 4.0),
        ("finished", "quick", "completed", 1.0),
        ("finished", "stubborn", "cancelled", 20.0),
    ]
    assert recorder.of("dropped") == [("dropped", "never", None, None)]
    assert job_names(caplog, logging.WARNING) == ["late", "never", "stubborn"]
    assert records(caplog, logging.ERROR) == []


# -- row 7: a job raises from `finally` while being cancelled -------------------------------


async def test_job_raises_from_finally_while_cancelled(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cleanup_failed = RuntimeError("cleanup failed")
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=2, drain_timeout=2.0)

    async def messy() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise cleanup_failed

    with pytest.raises(BackgroundShutdownError) as excinfo:
        async with open_background_runtime(config) as runtime:
            runtime.handle().spawn(messy, name="messy", request_id="r-m")
    assert trio.current_time() == 2.0
    final = runtime.statistics()
    # Running at the cut-off, so `cancelled` -- whatever it raised afterwards.
    assert all_counts(final) == expected(cancelled=1)
    assert excinfo.value.cancelled == (meta("messy", "r-m"),)
    assert excinfo.value.dropped == ()
    assert excinfo.value.statistics == final
    [error] = records(caplog, logging.ERROR)
    assert exc_of(error) is cleanup_failed
    assert error.__dict__["job_name"] == "messy"
    assert error.__dict__["request_id"] == "r-m"
    assert job_names(caplog, logging.WARNING) == ["messy"]


# -- row 8: a job blocks the thread ---------------------------------------------------------


async def test_job_blocks_the_thread_virtual_clock(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # time.sleep blocks the whole Trio thread for 50 ms of real time. The
    # autojump clock only jumps when every task is blocked in Trio, so virtual
    # time does not move meanwhile: the job ends at t=0 with duration 0.0, and a
    # 10 ms (virtual) timeout does not fire. Nothing is lost or miscounted.
    recorder = Recorder()
    real: list[float] = []

    async def hog() -> None:
        start = time.perf_counter()
        time.sleep(0.05)  # noqa: ASYNC251 (the fault under test)
        real.append(time.perf_counter() - start)
        await trio.lowlevel.checkpoint()

    async with open_background_runtime(instruments=[recorder]) as runtime:
        handle = runtime.handle()
        handle.spawn(hog, name="hog", timeout=0.01)
        handle.spawn(hog, name="hog2")
        handle.spawn(sleeper, 1.0, name="bystander")
        await runtime.wait_idle()
    assert trio.current_time() == 1.0
    assert len(real) == 2
    assert min(real) >= 0.05
    assert all_counts(runtime.statistics()) == expected(completed=3)
    assert sorted(recorder.of("finished")) == [
        ("finished", "bystander", "completed", 1.0),
        ("finished", "hog", "completed", 0.0),
        ("finished", "hog2", "completed", 0.0),
    ]
    assert records(caplog, logging.WARNING) == []


async def test_job_blocks_the_thread_real_clock(caplog: pytest.LogCaptureFixture) -> None:
    # The same fault under the real clock: the 10 ms timeout expires while the
    # thread is blocked, and the job is cancelled at its next checkpoint.
    async def hog() -> None:
        time.sleep(0.05)  # noqa: ASYNC251 (the fault under test)
        await trio.sleep(30)

    start = time.perf_counter()
    async with open_background_runtime() as runtime:
        runtime.handle().spawn(hog, name="hog", timeout=0.01)
    elapsed = time.perf_counter() - start
    assert 0.05 <= elapsed < 10
    assert all_counts(runtime.statistics()) == expected(timed_out=1)
    assert job_names(caplog, logging.WARNING) == ["hog"]


# -- row 9: a job exceeds its timeout -------------------------------------------------------


async def test_job_times_out(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = BackgroundTaskConfig(job_timeout=3.0)
    async with open_background_runtime(config, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        handle.spawn(trio.sleep_forever, name="default_limit", request_id="r-t")
        handle.spawn(trio.sleep_forever, name="own_limit", timeout=1.5)
        handle.spawn(sleeper, 2.0, name="in_time")
    assert trio.current_time() == 3.0
    assert all_counts(runtime.statistics()) == expected(completed=1, timed_out=2)
    assert sorted(recorder.of("finished")) == [
        ("finished", "default_limit", "timed_out", 3.0),
        ("finished", "in_time", "completed", 2.0),
        ("finished", "own_limit", "timed_out", 1.5),
    ]
    assert job_names(caplog, logging.WARNING) == ["default_limit", "own_limit"]
    warnings = records(caplog, logging.WARNING)
    assert {r.__dict__["job_name"]: r.__dict__["request_id"] for r in warnings} == {
        "default_limit": "r-t",
        "own_limit": None,
    }
    assert records(caplog, logging.ERROR) == []


async def test_job_shields_itself_past_its_own_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # "A job past its timeout is cancelled and counts as timed_out." Like a job
    # running at the drain cut-off, it counts so whatever it then does: this one
    # shields itself and runs 5 s on a 1 s limit.
    recorder = Recorder()

    async def shields() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(5)

    async with open_background_runtime(instruments=[recorder]) as runtime:
        runtime.handle().spawn(shields, name="shields", timeout=1.0)
    assert trio.current_time() == 5.0
    assert all_counts(runtime.statistics()) == expected(timed_out=1)
    assert recorder.of("finished") == [("finished", "shields", "timed_out", 5.0)]
    assert job_names(caplog, logging.WARNING) == ["shields"]


async def test_job_swallows_cancelled_at_its_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Same rule: the job was past its timeout and was cancelled; that it caught the
    # Cancelled and returned does not make it "completed".
    recorder = Recorder()

    async def swallows() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            return  # bad manners, but it happens

    async with open_background_runtime(instruments=[recorder]) as runtime:
        runtime.handle().spawn(swallows, name="swallows", timeout=2.0)
    assert trio.current_time() == 2.0
    assert all_counts(runtime.statistics()) == expected(timed_out=1)
    assert recorder.of("finished") == [("finished", "swallows", "timed_out", 2.0)]
    assert job_names(caplog, logging.WARNING) == ["swallows"]


# -- row 10: a callable that does not return a coroutine ------------------------------------


async def test_job_is_not_an_async_function(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def not_async(x: int) -> None:
        calls.append(x)

    async with open_background_runtime() as runtime:
        runtime.handle().spawn(cast(Any, not_async), 7, name="sync")
    assert calls == [7]  # called when the job started, not at submit
    assert all_counts(runtime.statistics()) == expected(failed=1)
    [error] = records(caplog, logging.ERROR)
    assert isinstance(exc_of(error), TypeError)
    assert error.__dict__["job_name"] == "sync"


# -- row 11-12: jobs that spawn jobs --------------------------------------------------------


async def test_jobs_spawn_jobs_before_drain(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    # Room for every descendant: a job awaiting send() keeps its slot while it
    # waits, so with one slot a full queue would deadlock it.
    config = BackgroundTaskConfig(max_queue_size=16, max_concurrent_tasks=1)

    async with open_background_runtime(config, instruments=[recorder]) as runtime:
        handle = runtime.handle()

        async def parent(depth: int) -> None:
            await trio.sleep(1)
            if depth < 3:
                handle.spawn(parent, depth + 1, name=f"spawned{depth + 1}")
                await handle.send(parent, depth + 1, name=f"sent{depth + 1}")

        handle.spawn(parent, 0, name="root")
        await runtime.wait_idle()
    # 1 + 2 + 4 + 8 jobs, one at a time, one second each.
    assert trio.current_time() == 15.0
    assert all_counts(runtime.statistics()) == expected(completed=15)
    assert len(recorder.of("accepted")) == 15
    # With one slot, jobs start in acceptance order.
    accepted = [name for _, name, _, _ in recorder.of("accepted")]
    started = [name for _, name, _, _ in recorder.of("started")]
    assert started == accepted


async def test_jobs_spawn_jobs_during_drain(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    refusals: list[BaseException] = []

    async with open_background_runtime() as runtime:
        handle = runtime.handle()

        async def polite() -> None:
            await trio.sleep(1)
            try:
                handle.spawn(sleeper, 1.0, name="child")
            except RuntimeClosedError as exc:
                refusals.append(exc)
            try:
                await handle.send(sleeper, 1.0, name="child")
            except RuntimeClosedError as exc:
                refusals.append(exc)

        async def careless() -> None:
            await trio.sleep(1)
            handle.spawn(sleeper, 1.0, name="child")

        handle.spawn(polite, name="polite")
        handle.spawn(careless, name="careless")
    # Drain began at t=0; the parents' spawns at t=1 were refused, and the
    # drain ended when the parents did.
    assert trio.current_time() == 1.0
    assert [str(e) for e in refusals] == ["background runtime is closed"] * 2
    final = runtime.statistics()
    assert all_counts(final) == expected(completed=1, failed=1)
    assert final.accepted == 2
    [error] = records(caplog, logging.ERROR)
    assert isinstance(exc_of(error), RuntimeClosedError)
    assert error.__dict__["job_name"] == "careless"
    assert records(caplog, logging.WARNING) == []


# -- row 13: aclose() from a job ------------------------------------------------------------


async def test_aclose_from_a_job(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, float, bool]] = []

    async with open_background_runtime() as runtime:
        handle = runtime.handle()

        async def closes_politely() -> None:
            await trio.sleep(1)
            try:
                await runtime.aclose()
            except RuntimeError as exc:
                # Raised at once, and the runtime is still open.
                seen.append((str(exc), trio.current_time(), runtime.statistics().closed))
            handle.spawn(sleeper, 1.0, name="after")

        async def closes_carelessly() -> None:
            await trio.sleep(2)
            await runtime.aclose()

        handle.spawn(closes_politely, name="polite")
        handle.spawn(closes_carelessly, name="careless")
        await runtime.wait_idle()
        assert trio.current_time() == 2.0
        assert not runtime.statistics().closed
        handle.spawn(sleeper, 1.0, name="still_open")
    assert trio.current_time() == 3.0
    [(message, at, closed)] = seen
    assert "would wait for itself" in message
    assert at == 1.0
    assert not closed
    assert all_counts(runtime.statistics()) == expected(completed=3, failed=1)
    [error] = records(caplog, logging.ERROR)
    assert isinstance(exc_of(error), RuntimeError)
    assert "would wait for itself" in str(exc_of(error))
    assert error.__dict__["job_name"] == "careless"


# -- row 14: an instrument raises -----------------------------------------------------------


class Exploding(Recorder):
    """Records like Recorder, but raises from one chosen hook."""

    def __init__(self, hook: str) -> None:
        super().__init__()
        self.hook = hook
        self.error = RuntimeError(f"instrument broke in {hook}")

    def _maybe_raise(self, hook: str) -> None:
        if hook == self.hook:
            raise self.error

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        super().job_accepted(job)
        self._maybe_raise("job_accepted")

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        super().job_rejected(job)
        self._maybe_raise("job_rejected")

    def job_started(self, job: BackgroundJobMetadata) -> None:
        super().job_started(job)
        self._maybe_raise("job_started")

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        super().job_finished(job, outcome, duration)
        self._maybe_raise("job_finished")

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        super().job_dropped(job)
        self._maybe_raise("job_dropped")


@pytest.mark.parametrize(
    "hook", ["job_accepted", "job_started", "job_rejected", "job_finished", "job_dropped"]
)
async def test_instrument_raises(
    hook: str, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # One scenario fires every hook: A runs, B queues, C is rejected; at t=1 A
    # completes and B starts, D queues; the drain deadline at t=3 cancels B and
    # drops D. The instrument `bad` raises from `hook` the first time it is called.
    bad = Exploding(hook)
    good = Recorder()
    config = BackgroundTaskConfig(max_queue_size=1, max_concurrent_tasks=1, drain_timeout=2.0)
    opened: list[BackgroundRuntime] = []

    async def scenario() -> None:
        async with open_background_runtime(config, instruments=[bad, good]) as runtime:
            opened.append(runtime)
            handle = runtime.handle()
            handle.spawn(sleeper, 1.0, name="A")
            handle.spawn(trio.sleep_forever, name="B")
            with pytest.raises(QueueFullError, match=r"^background task queue is full$"):
                handle.spawn(sleeper, 1.0, name="C")
            await trio.sleep(1)
            await trio.testing.wait_all_tasks_blocked()  # A has ended, B has started
            handle.spawn(sleeper, 1.0, name="D")

    with pytest.raises(BackgroundShutdownError) as excinfo:
        await scenario()
    [runtime] = opened
    assert trio.current_time() == 3.0
    # The runtime and the jobs were not disturbed.
    final = runtime.statistics()
    assert all_counts(final) == expected(completed=1, cancelled=1, dropped=1, rejected=1)
    assert excinfo.value.cancelled == (meta("B"),)
    assert excinfo.value.dropped == (meta("D"),)
    # The well-behaved instrument saw every hook.
    # job_started fires in the job's own task, when its code begins.
    assert good.calls[:7] == [
        ("accepted", "A", None, None),
        ("accepted", "B", None, None),
        ("rejected", "C", None, None),
        ("started", "A", None, None),
        ("finished", "A", "completed", 1.0),
        ("started", "B", None, None),
        ("accepted", "D", None, None),
    ]
    assert sorted(good.calls[7:]) == [
        ("dropped", "D", None, None),
        ("finished", "B", "cancelled", 2.0),
    ]
    # The exploding one was called up to its first failure, and never again.
    first = next(i for i, call in enumerate(good.calls) if f"job_{call[0]}" == hook)
    assert bad.calls == good.calls[: first + 1]
    # Logged once, at ERROR, with the instrument's exception.
    [error] = records(caplog, logging.ERROR)
    assert exc_of(error) is bad.error
    assert job_names(caplog, logging.WARNING) == ["B", "D"]


# -- row 15: threads submit through trio.from_thread while the runtime drains --------------


async def test_threads_submit_while_draining(caplog: pytest.LogCaptureFixture) -> None:
    # Real threads and the real clock. Each worker thread submits through
    # trio.from_thread.run_sync until it is refused with RuntimeClosedError.
    # Jobs wait on `release`, so the runtime is still draining (jobs running,
    # more queued) while the threads are being refused.
    threads = 4
    warmup = 25  # accepted per thread before shutdown may begin
    config = BackgroundTaskConfig(max_queue_size=100_000, max_concurrent_tasks=8)
    release = trio.Event()
    all_warm = trio.Event()
    warm = 0
    results: list[tuple[int, int, str]] = []

    def mark_warm() -> None:
        nonlocal warm
        warm += 1
        if warm == threads:
            all_warm.set()

    def worker(handle: BackgroundHandle, index: int) -> tuple[int, int, str]:
        accepted = full = 0
        while True:
            try:
                trio.from_thread.run_sync(
                    functools.partial(handle.spawn, release.wait, name=f"t{index}")
                )
            except QueueFullError:
                full += 1
            except RuntimeClosedError as exc:
                return accepted, full, str(exc)
            else:
                accepted += 1
                if accepted == warmup:
                    trio.from_thread.run_sync(mark_warm)

    async def run_worker(handle: BackgroundHandle, index: int) -> None:
        results.append(await trio.to_thread.run_sync(worker, handle, index))
        if len(results) == threads:
            all_refused.set()

    all_refused = trio.Event()
    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        async with trio.open_nursery() as nursery:
            for index in range(threads):
                nursery.start_soon(run_worker, handle, index)
            await all_warm.wait()
            nursery.start_soon(runtime.aclose)  # the drain begins while threads submit
            await all_refused.wait()
            # Every thread has been refused; the jobs are still held: still draining.
            during = runtime.statistics()
            release.set()
    accepted = sum(a for a, _, _ in results)
    full = sum(f for _, f, _ in results)
    assert len(results) == threads
    assert all(a >= warmup for a, _, _ in results)
    assert {message for _, _, message in results} == {"background runtime is closed"}
    assert during.closed
    assert during.accepted == accepted
    assert during.running == min(accepted, 8)
    assert during.queued == accepted - during.running
    final = runtime.statistics()
    assert all_counts(final) == expected(completed=accepted, rejected=full)
    assert final.accepted == accepted
    assert records(caplog, logging.WARNING) == []
    assert records(caplog, logging.ERROR) == []


# -- row 16: the outer scope is cancelled mid-drain -----------------------------------------


async def test_outer_scope_cancelled_mid_drain(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=10.0)
    with trio.move_on_after(3) as outer:
        async with open_background_runtime(config, instruments=[recorder]) as runtime:
            handle = runtime.handle()
            handle.spawn(sleeper, 2.0, name="first")  # completes at t=2
            handle.spawn(sleeper, 5.0, name="second")  # runs from t=2, cut off at t=3
            handle.spawn(sleeper, 1.0, name="third")  # still queued at t=3
        pytest.fail("the cancellation must propagate out of the block")  # pragma: no cover
    # The cancellation propagated (no BackgroundShutdownError) and cut off at once.
    assert outer.cancelled_caught
    assert trio.current_time() == 3.0
    final = runtime.statistics()
    assert all_counts(final) == expected(completed=1, cancelled=1, dropped=1)
    assert recorder.of("finished") == [
        ("finished", "first", "completed", 2.0),
        ("finished", "second", "cancelled", 1.0),
    ]
    assert recorder.of("dropped") == [("dropped", "third", None, None)]
    assert job_names(caplog, logging.WARNING) == ["second", "third"]
    assert records(caplog, logging.ERROR) == []


async def test_outer_scope_cancelled_mid_drain_with_shielded_job(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The cut-off at t=3 is at once, but a job that shields itself keeps running
    # until t=8; nothing runs after the block, so the cancellation propagates then.
    async def stubborn() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(8)

    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=2, drain_timeout=60.0)
    with trio.move_on_after(3) as outer:
        async with open_background_runtime(config) as runtime:
            handle = runtime.handle()
            handle.spawn(stubborn, name="stubborn")
            handle.spawn(trio.sleep_forever, name="forever")
            handle.spawn(trio.sleep_forever, name="queued")
    assert outer.cancelled_caught
    assert trio.current_time() == 8.0
    assert all_counts(runtime.statistics()) == expected(cancelled=2, dropped=1)
    assert job_names(caplog, logging.WARNING) == ["forever", "queued", "stubborn"]


async def test_task_awaiting_aclose_cancelled(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=math.inf)
    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(sleeper, 5.0, name="running")
        handle.spawn(sleeper, 5.0, name="queued")
        with trio.move_on_after(1) as scope:
            await runtime.aclose()
        assert scope.cancelled_caught
        assert trio.current_time() == 1.0
        cut = runtime.statistics()
        assert all_counts(cut) == expected(cancelled=1, dropped=1)
    # Leaving the block calls aclose() again: it returns None.
    assert trio.current_time() == 1.0
    assert runtime.statistics() == cut
    assert job_names(caplog, logging.WARNING) == ["queued", "running"]


# -- row 17: the body raises ----------------------------------------------------------------


async def test_body_raises(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    problem = LookupError("body failed")
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=60.0)
    opened: list[BackgroundRuntime] = []

    async def scenario() -> None:
        async with open_background_runtime(config) as runtime:
            opened.append(runtime)
            handle = runtime.handle()
            handle.spawn(sleeper, 5.0, name="running")
            handle.spawn(sleeper, 5.0, name="queued")
            await trio.sleep(0.5)
            raise problem

    with pytest.raises(LookupError) as excinfo:
        await scenario()
    [runtime] = opened
    # Unchanged, unwrapped, and no drain: cut off at once.
    assert excinfo.value is problem
    assert trio.current_time() == 0.5
    assert all_counts(runtime.statistics()) == expected(cancelled=1, dropped=1)
    assert job_names(caplog, logging.WARNING) == ["queued", "running"]
    assert records(caplog, logging.ERROR) == []
