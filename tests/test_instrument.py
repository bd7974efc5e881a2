"""Instruments: every hook in order, instruments of any shape, and hooks that misbehave.

A hook that raises, re-enters the runtime or interrupts never derails the runtime.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from typing import Any

import pytest
import trio
import trio.testing
from helpers import (
    Recorder,
    all_counts,
    check_invariants,
    counts,
    exc_of,
    expected,
    job_names,
    meta,
    records,
    sleeper,
)

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

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


# -- the hooks ------------------------------------------------------------------------------


def test_instrument_base_hooks_do_nothing() -> None:
    instrument = BackgroundInstrument()
    job = BackgroundJobMetadata()
    for hook in ("job_accepted", "job_due", "job_rejected", "job_started", "job_dropped"):
        assert getattr(instrument, hook)(job) is None
    instrument.job_scheduled(job, 1.0)
    instrument.job_failed(job, ValueError())
    instrument.job_retrying(job, ValueError(), 1.0)
    instrument.job_finished(job, "completed", 0.0)


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


async def test_instruments_need_not_inherit_and_may_lack_hooks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Objects need not subclass BackgroundInstrument: the hooks they lack are skipped, and
    # an object with no hook at all is accepted too.
    class OnlyFinished:
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, float]] = []

        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            self.seen.append((job.name, outcome, duration))

    only = OnlyFinished()

    async def fail() -> None:
        raise ValueError("x")

    async with open_background_runtime(instruments=[object(), only]) as runtime:
        runtime.handle().spawn(sleeper, 0.75, name="slowish")
        runtime.handle().spawn(fail)
        await runtime.aclose()
        with pytest.raises(RuntimeClosedError, match=r"^background runtime is closed$"):
            runtime.handle().spawn(sleeper, 0.0)
    assert sorted(only.seen) == [("slowish", "completed", 0.75), (fail.__qualname__, "failed", 0.0)]
    assert counts(runtime) == {"completed": 1, "failed": 1}


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


# -- hooks that raise -----------------------------------------------------------------------


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
    assert error.getMessage() == f"instrument {bad!r} raised in {hook}; removing it"
    assert job_names(caplog, logging.WARNING) == ["B", "D"]


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


async def test_keyboard_interrupt_from_job_started_stops_the_job_before_its_code(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The instruments saw the job start: it ends cancelled at once (never dropped after a
    # start, which would leave a gauge of running jobs at 1), and its code never runs.
    ran: list[str] = []
    recorder = Recorder()

    class Interrupts:
        def job_started(self, job: BackgroundJobMetadata) -> None:
            raise KeyboardInterrupt

    async def job() -> None:
        ran.append("job")

    with trio.fail_after(10), pytest.raises(KeyboardInterrupt):
        async with open_background_runtime(instruments=[recorder, Interrupts()]) as runtime:
            runtime.handle().spawn(job, name="j")
            await trio.sleep(5)
    assert ran == []
    assert all_counts(runtime.statistics()) == expected(cancelled=1)
    assert recorder.calls == [
        ("accepted", "j", None, None),
        ("started", "j", None, None),
        ("finished", "j", "cancelled", 0.0),
    ]


async def test_an_instrument_given_twice_is_installed_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    class Bad:
        def job_started(self, job: BackgroundJobMetadata) -> None:
            calls.append(job.name)
            raise RuntimeError("broken")

    bad = Bad()
    async with open_background_runtime(instruments=[bad, bad]) as runtime:
        runtime.handle().spawn(sleeper, 0)
    assert len(calls) == 1
    assert len(records(caplog, logging.ERROR)) == 1


async def test_job_failed_comes_right_before_job_finished_with_the_jobs_exception(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[str, str, object]] = []
    raised: list[BaseException] = []

    class Errors:
        def job_failed(self, job: BackgroundJobMetadata, exception: BaseException) -> None:
            calls.append(("failed", job.name, exception))

        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            calls.append(("finished", job.name, outcome))

    async def fails() -> None:
        error = ValueError("no")
        raised.append(error)
        raise error

    async def not_async() -> None:
        pass

    config = BackgroundTaskConfig(max_concurrent_tasks=1, drain_timeout=60)
    async with open_background_runtime(config, instruments=[Errors()]) as runtime:
        handle = runtime.handle()
        handle.spawn(fails, name="fails")
        handle.spawn(trio.sleep, 0, name="fine")
        handle.spawn(trio.sleep_forever, name="slow", timeout=1)
        job: Any = handle.spawn(lambda: None, name="sync")  # type: ignore[arg-type, return-value]
        await runtime.wait_idle()
    assert calls[:2] == [("failed", "fails", raised[0]), ("finished", "fails", "failed")]
    assert calls[2:4] == [("finished", "fine", "completed"), ("finished", "slow", "timed_out")]
    assert calls[4][:2] == ("failed", "sync")
    assert isinstance(calls[4][2], TypeError)
    assert calls[5] == ("finished", "sync", "failed")
    assert len(calls) == 6
    with pytest.raises(TypeError) as info:
        await job.wait()
    assert info.value is calls[4][2]
