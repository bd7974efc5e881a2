"""Shutdown: aclose() and its drain, the cut-off, the report it raises, and wait_idle().

What leaves the ``async with`` block when its body raises or is cancelled is in
``test_runtime.py``; how a job cut off in a nursery of its own counts is in ``test_job.py``.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import sys
import threading
import weakref
from typing import Any

import pytest
import trio
import trio.testing
from helpers import (
    Recorder,
    all_counts,
    counts,
    exc_of,
    expected,
    job_names,
    messages,
    meta,
    records,
    sleeper,
)

from trio_background import (
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    open_background_runtime,
)

# -- aclose() drains, once ------------------------------------------------------------------


async def test_nothing_to_cut_returns_none_even_with_drain_timeout_zero(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(drain_timeout=0)
    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(sleeper, 1)
        await runtime.wait_idle()
        t0 = trio.current_time()
        await runtime.aclose()  # returns None: raises nothing
        # No polling floor: not even a virtual tick passed.
        assert trio.current_time() == t0
        assert counts(runtime) == {"completed": 1}
    # The same for a runtime that never had a job.
    async with open_background_runtime(config) as runtime:
        t0 = trio.current_time()
        await runtime.aclose()
        assert trio.current_time() == t0


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


@pytest.mark.parametrize("method", ["aclose", "wait_idle"])
async def test_aclose_or_wait_idle_from_inside_a_job_raises_at_once(
    method: str, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # It would wait for itself: RuntimeError at once, and the runtime stays open.
    message = f"{method}() called from inside one of this runtime's own jobs would wait for itself"
    seen: list[tuple[str, float, BackgroundStatistics, BackgroundStatistics]] = []

    async with open_background_runtime() as runtime:
        handle = runtime.handle()

        async def call() -> None:
            if method == "aclose":
                await runtime.aclose()
            else:
                await runtime.wait_idle()

        async def polite(label: str) -> None:
            await trio.sleep(1)
            before = runtime.statistics()
            with pytest.raises(RuntimeError, match=rf"^{re.escape(message)}$"):
                await call()
            seen.append((label, trio.current_time(), before, runtime.statistics()))
            handle.spawn(sleeper, 1.0, name=f"after_{label}")  # still accepting

        async def in_a_nursery() -> None:
            # A task in a nursery inside a job still belongs to that job.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(polite, "nested")

        async def careless() -> None:
            await trio.sleep(2)
            await call()

        handle.spawn(polite, "direct", name="polite")
        handle.spawn(in_a_nursery, name="nested")
        handle.spawn(careless, name="careless")
        await runtime.wait_idle()  # fine from the body
        assert trio.current_time() == 2.0
        assert not runtime.statistics().closed
        handle.spawn(sleeper, 1.0, name="still_open")
    assert trio.current_time() == 3.0
    # Raised at once, changing nothing: the runtime was still open.
    assert sorted((label, at) for label, at, _, _ in seen) == [("direct", 1.0), ("nested", 1.0)]
    for _, _, before, after in seen:
        assert after == before
        assert not after.closed
    # polite, nested, after_direct, after_nested and still_open completed; careless failed.
    assert all_counts(runtime.statistics()) == expected(completed=5, failed=1)
    [error] = records(caplog, logging.ERROR)
    assert type(exc_of(error)) is RuntimeError
    assert str(exc_of(error)) == message
    assert error.__dict__["job_name"] == "careless"


# -- the cut-off and its report -------------------------------------------------------------


async def test_report_message_names_the_cut_off_jobs_with_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_concurrent_tasks=3, drain_timeout=1.0)
    with pytest.raises(BackgroundShutdownError) as excinfo:
        async with open_background_runtime(config) as runtime:
            handle = runtime.handle()
            for name in ["send_email", "send_email", "reindex", "warm", "warm"]:
                handle.spawn(trio.sleep_forever, name=name)
    assert str(excinfo.value) == (
        "drain timed out after 1 seconds: cancelled 3 jobs still running "
        "(send_email x2, reindex); dropped 2 jobs never started (warm x2)"
    )


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


async def test_job_handed_a_slot_at_the_cut_off_never_runs_and_counts_dropped(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # "first" ends at t=1 and hands its slot to "second"; in that same step, before
    # "second"'s task has run, a hook's KeyboardInterrupt cuts the runtime off.
    ran: list[str] = []
    recorder = Recorder()
    interrupt = KeyboardInterrupt()

    class CutsOff:
        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            if job.name == "first":
                assert runtime.statistics().running == 1  # "second" holds the slot
                raise interrupt

    async def second() -> None:
        ran.append("second")

    config = BackgroundTaskConfig(max_concurrent_tasks=1)
    with pytest.raises(KeyboardInterrupt) as excinfo:
        async with open_background_runtime(config, instruments=[recorder, CutsOff()]) as runtime:
            handle = runtime.handle()
            handle.spawn(sleeper, 1, name="first")
            handle.spawn(second, name="second")
            await trio.sleep_forever()
    assert excinfo.value is interrupt
    assert ran == []
    assert all_counts(runtime.statistics()) == expected(completed=1, dropped=1)
    assert ("started", "second") not in recorder.pairs()
    assert ("dropped", "second") in recorder.pairs()
    assert messages(caplog, logging.WARNING) == [
        "background job 'second' dropped at shutdown without starting"
    ]


async def test_job_started_at_once_and_cut_off_before_its_first_step_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ran: list[str] = []
    recorder = Recorder()

    async def job() -> None:
        ran.append("job")

    with pytest.raises(KeyError):
        async with open_background_runtime(instruments=[recorder]) as runtime:
            runtime.handle().spawn(job, name="job")
            assert runtime.statistics().running == 1
            raise KeyError("body")  # no checkpoint between: the cut-off comes first
    assert ran == []
    assert all_counts(runtime.statistics()) == expected(dropped=1)
    assert recorder.pairs() == [("accepted", "job"), ("dropped", "job")]


async def test_cut_off_jobs_are_reported_by_metadata_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Payload:
        pass

    refs: list[weakref.ref[Payload]] = []

    async def holds(payload: Payload) -> None:
        await trio.sleep_forever()

    config = BackgroundTaskConfig(max_concurrent_tasks=1, drain_timeout=1.0)
    with pytest.raises(BackgroundShutdownError) as excinfo:
        async with open_background_runtime(config) as runtime:
            for _ in range(2):  # one cancelled, one dropped
                payload = Payload()
                refs.append(weakref.ref(payload))
                runtime.handle().spawn(holds, payload)
            del payload
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    assert len(excinfo.value.cancelled) == len(excinfo.value.dropped) == 1


# -- cancelled while draining ---------------------------------------------------------------


async def test_task_awaiting_aclose_cancelled(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Cut off at once, as at the deadline (never after drain_timeout, here infinite), and
    # the cancellation propagates out of aclose().
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=math.inf)
    cancelled_at: list[float] = []

    async def job() -> None:
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            raise

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(job, name="running")
        handle.spawn(job, name="queued-1")
        handle.spawn(job, name="queued-2")
        with trio.move_on_after(1) as scope:
            await runtime.aclose()
        assert scope.cancelled_caught
        assert trio.current_time() == 1.0
        # Counted as at the deadline, and the cancelled job has really ended:
        # after aclose() returns or raises, queued == running == 0.
        cut = runtime.statistics()
        assert cut.closed
        assert counts(runtime) == {"cancelled": 1, "dropped": 2}
        assert cancelled_at == [1.0]
    # Leaving the block calls aclose() again: it returns None, with nothing left to report.
    assert trio.current_time() == 1.0
    assert runtime.statistics() == cut
    assert job_names(caplog, logging.WARNING) == ["queued-1", "queued-2", "running"]


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


# -- wait_idle() ----------------------------------------------------------------------------


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


async def test_wait_idle_returns_at_the_first_idle_instant_under_a_steady_producer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A producer spawns a new one-second job the instant each one ends, from a hook.
    # The runtime is idle for an instant each time; wait_idle() must catch the first.
    returned: list[float] = []

    class Refill:
        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            if trio.current_time() < 5:
                handle.spawn(sleeper, 1)

    async with open_background_runtime(instruments=[Refill()]) as runtime:
        handle = runtime.handle()
        handle.spawn(sleeper, 1)

        async def waiter() -> None:
            await runtime.wait_idle()
            returned.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
    assert returned == [1.0]


async def test_report_message_names_every_cut_off_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    names = [f"job_{i}" for i in range(25)]
    config = BackgroundTaskConfig(max_concurrent_tasks=30, drain_timeout=1)
    with pytest.raises(BackgroundShutdownError) as excinfo:
        async with open_background_runtime(config) as runtime:
            for name in names:
                runtime.handle().spawn(trio.sleep_forever, name=name)
    assert all(name in str(excinfo.value) for name in names)


def test_wait_idle_from_a_foreign_trio_thread_raises_there() -> None:
    box: dict[str, object] = {}

    async def main() -> None:
        async with open_background_runtime() as runtime:
            runtime.handle().spawn(trio.sleep, 0.5)

            async def foreign() -> None:
                try:
                    await runtime.wait_idle()
                except RuntimeError as exc:
                    box["error"] = exc

            thread = threading.Thread(target=trio.run, args=(foreign,))
            thread.start()
            await trio.to_thread.run_sync(thread.join, 10)
        box["stats"] = runtime.statistics()

    trio.run(main)
    assert isinstance(box["error"], RuntimeError)
    assert "trio.from_thread.run(runtime.wait_idle)" in str(box["error"])
    assert isinstance(box["stats"], BackgroundStatistics)
    assert box["stats"].completed == 1


def test_shutdown_code_cannot_be_interrupted_by_ctrl_c() -> None:
    # Ctrl-C is delivered to KI-protected code at its next checkpoint, never between two
    # of its lines: so it cannot land between closing intake and cutting off. Record, on
    # every line of the shutdown path, whether Trio would raise KeyboardInterrupt there.
    import types

    from trio_background import _shutdown

    watched = {
        _shutdown.Shutdown.close_intake.__code__,
        _shutdown.Shutdown.aclose.__code__,
        _shutdown.Shutdown.cut_off.__code__,
    }
    unprotected: list[tuple[str, int]] = []

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code in watched or frame.f_code.co_name == "_open":
            if event == "line" and not trio.lowlevel.currently_ki_protected():
                unprotected.append((frame.f_code.co_name, frame.f_lineno))
            return tracer
        return None

    async def main() -> None:
        config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=1, drain_timeout=1)
        with pytest.raises(BackgroundShutdownError):
            async with open_background_runtime(config) as runtime:
                runtime.handle().spawn(trio.sleep_forever)
                runtime.handle().spawn(trio.sleep_forever)
                sys.settrace(tracer)
        sys.settrace(None)

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        sys.settrace(None)
    assert unprotected == []
