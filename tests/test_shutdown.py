"""Shutdown and its report: what the cut-off cuts, and how it says so."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import trio
import trio.testing
from helpers import Recorder, all_counts, expected, records, sleeper

from trio_background import (
    BackgroundJobMetadata,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    open_background_runtime,
)


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


async def test_nothing_to_cut_returns_none_even_with_drain_timeout_zero(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(drain_timeout=0)
    async with open_background_runtime(config) as runtime:
        runtime.handle().spawn(sleeper, 1)
        await runtime.wait_idle()
        await runtime.aclose()  # returns None: raises nothing


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
    assert [r.getMessage() for r in records(caplog, logging.WARNING)] == [
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
