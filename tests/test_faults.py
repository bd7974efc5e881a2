"""The fault matrix: one test per row, each asserting exact counters and the exact report.

The rows (and what each asserts) are tabulated in ``docs/reliability.rst``.
Virtual time comes from the ``autojump_clock`` fixture except where a row is
about real threads or real time.
"""

from __future__ import annotations

import logging
import math

import pytest
import trio
import trio.testing
from helpers import LOGGER, Recorder, all_counts, expected, records, sleeper

from trio_background import (
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    QueueFullError,
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


# -- row 4-5: KeyboardInterrupt / SystemExit ------------------------------------------------


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


# -- row 8: a job blocks the thread ---------------------------------------------------------


# -- row 9: a job exceeds its timeout -------------------------------------------------------


# -- row 10: a callable that does not return a coroutine ------------------------------------


# -- row 11-12: jobs that spawn jobs --------------------------------------------------------


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
