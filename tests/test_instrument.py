"""Instruments: hooks that raise, re-enter, or interrupt never derail the runtime."""

from __future__ import annotations

import contextlib
import logging
import sys
import types

import pytest
import trio
import trio.testing
from helpers import Recorder, all_counts, check_invariants, expected, records, sleeper

from trio_background import (
    BackgroundJobMetadata,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


@pytest.mark.parametrize("error", [SystemExit(1), GeneratorExit(), trio.Cancelled._create()])
async def test_a_hook_raising_a_base_exception_is_removed_and_the_slot_handed_on(
    error: BaseException, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    class Bad:
        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            calls.append(job.name)
            raise error

    config = BackgroundTaskConfig(max_concurrent_tasks=1)
    async with open_background_runtime(config, instruments=[Bad()]) as runtime:
        handle = runtime.handle()
        handle.spawn(sleeper, 1, name="a")
        handle.spawn(sleeper, 1, name="b")
        await runtime.wait_idle()
    assert calls == ["a"]
    assert all_counts(runtime.statistics()) == expected(completed=2)
    [record] = records(caplog, logging.ERROR)
    assert record.getMessage().endswith("raised in job_finished; removing it")


async def test_an_instrument_of_plain_functions_is_removed_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[str] = []

    def accepted(job: BackgroundJobMetadata) -> None:
        calls.append("accepted")
        raise RuntimeError("broken")

    def finished(job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        calls.append("finished")

    bag = types.SimpleNamespace(job_accepted=accepted, job_finished=finished)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logging.getLogger("trio_background"), "disabled", True)
        async with open_background_runtime(instruments=[bag]) as runtime:
            runtime.handle().spawn(sleeper, 1)
    assert calls == ["accepted"]


async def test_an_instrument_removed_inside_a_reentrant_spawn_is_not_called_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[str] = []

    class Reenters:
        def job_accepted(self, job: BackgroundJobMetadata) -> None:
            if job.name == "outer":
                handle.spawn(sleeper, 1, name="inner")

    class Breaks:
        def job_accepted(self, job: BackgroundJobMetadata) -> None:
            calls.append(job.name)
            raise RuntimeError("broken")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logging.getLogger("trio_background"), "disabled", True)
        async with open_background_runtime(instruments=[Reenters(), Breaks()]) as runtime:
            handle = runtime.handle()
            handle.spawn(sleeper, 1, name="outer")
    # Removed while handling "inner" (inside the outer call): never called for "outer".
    assert calls == ["inner"]


@pytest.mark.parametrize(
    "hook", ["job_accepted", "job_started", "job_finished", "job_dropped", "job_rejected"]
)
async def test_keyboard_interrupt_from_a_hook_leaves_the_block_with_nothing_left(
    hook: str, autojump_clock: trio.testing.MockClock
) -> None:
    interrupt = KeyboardInterrupt()

    class Interrupts:
        fired = False

        def __getattr__(self, name: str) -> object:
            if name != hook:
                raise AttributeError(name)

            def method(*args: object) -> None:
                if not self.fired:
                    self.fired = True
                    raise interrupt

            return method

    # "a" runs forever, "b" waits, "c" is rejected; the drain deadline at t=1 cancels "a"
    # and drops "b". So every hook fires once; the first call of `hook` interrupts.
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=1, drain_timeout=1)
    with trio.fail_after(10), pytest.raises(BaseException) as excinfo:  # noqa: PT011
        async with open_background_runtime(config, instruments=[Interrupts()]) as runtime:
            handle = runtime.handle()
            for name in "abc":
                # After an interrupt the runtime is closed: later spawns are refused.
                with contextlib.suppress(QueueFullError, RuntimeClosedError):
                    handle.spawn(trio.sleep_forever, name=name)
    # At the cut-off, the interrupt leaves beside the report it interrupted.
    assert excinfo.value is interrupt or (
        isinstance(excinfo.value, BaseExceptionGroup)
        and [type(e) for e in excinfo.value.exceptions]
        == [BackgroundShutdownError, KeyboardInterrupt]
        and excinfo.value.exceptions[1] is interrupt
        and hook in ("job_finished", "job_dropped")
    )
    s = runtime.statistics()
    check_invariants(s)
    assert (s.queued, s.running) == (0, 0)
    assert s.accepted == s.cancelled + s.dropped + s.completed


async def test_keyboard_interrupt_while_logging_a_failed_job_strands_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    interrupt = KeyboardInterrupt()
    ran: list[str] = []

    class InterruptOnce(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

        def handle(self, record: logging.LogRecord) -> bool:
            if record.getMessage() == "background job 'fails' failed":
                raise interrupt
            return True

    async def fails() -> None:
        await trio.sleep(1)
        raise ValueError("boom")

    async def next_job() -> None:
        ran.append("next")

    handler = InterruptOnce()
    logger = logging.getLogger("trio_background")
    logger.addHandler(handler)
    try:
        config = BackgroundTaskConfig(max_concurrent_tasks=1)
        with trio.fail_after(10), pytest.raises(KeyboardInterrupt) as excinfo:
            async with open_background_runtime(config) as runtime:
                runtime.handle().spawn(fails, name="fails")
                runtime.handle().spawn(next_job, name="next")
                await trio.sleep_forever()
    finally:
        logger.removeHandler(handler)
    assert excinfo.value is interrupt
    s = runtime.statistics()
    assert (s.queued, s.running) == (0, 0)
    check_invariants(s)
    assert s.failed == 1
    assert s.completed + s.dropped == 1  # "next" ran or was reported, never stranded
    assert ran == ([] if s.dropped else ["next"])


async def test_hooks_see_counters_that_add_up_against_their_own_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen = Recorder()
    accepted = 0

    class Checks:
        def check(self) -> None:
            s = runtime.statistics()
            check_invariants(s)
            assert s.accepted == accepted

        def job_started(self, job: BackgroundJobMetadata) -> None:
            self.check()

        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            self.check()

    config = BackgroundTaskConfig(max_concurrent_tasks=2, max_queue_size=3)
    async with open_background_runtime(config, instruments=[seen, Checks()]) as runtime:
        handle = runtime.handle()
        for i in range(5):
            handle.spawn(sleeper, i % 3)
            accepted += 1
    assert len(seen.of("finished")) == accepted
