"""Running one job: how it ended, whatever shape its code (nurseries, cancel scopes) gives it."""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from helpers import all_counts, expected, records

from trio_background import (
    BackgroundJobMetadata,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    open_background_runtime,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

Job = Callable[[], Awaitable[None]]


def nested(depth: int, body: Job, *, strict: bool = True) -> Job:
    """``body`` run as a child task ``depth`` nurseries down, beside a sleeping sibling."""

    async def job() -> None:
        if depth == 0:
            await body()
            return
        async with trio.open_nursery(strict_exception_groups=strict) as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(nested(depth - 1, body, strict=strict))

    return job


async def raises_in_cleanup() -> None:
    try:
        await trio.sleep_forever()
    finally:
        raise ValueError("cleanup failed")


# Non-strict nurseries are deprecated, but still in use: they must be counted right too.
NON_STRICT = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")
SHAPES = [
    pytest.param(0, True, id="bare"),
    pytest.param(1, True, id="nursery"),
    pytest.param(2, True, id="nursery-in-nursery"),
    pytest.param(1, False, id="nursery-non-strict", marks=NON_STRICT),
    pytest.param(2, False, id="nursery-in-nursery-non-strict", marks=NON_STRICT),
]


# -- cut off at the drain deadline -----------------------------------------------------------


@pytest.mark.parametrize(("depth", "strict"), SHAPES)
async def test_job_with_nurseries_cut_off_at_the_deadline_counts_cancelled(
    depth: int,
    strict: bool,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = BackgroundTaskConfig(drain_timeout=1.0)
    job = nested(depth, trio.sleep_forever, strict=strict)
    with pytest.raises(BackgroundShutdownError) as excinfo:
        async with open_background_runtime(config) as runtime:
            runtime.handle().spawn(job, name="with_nursery")
    assert excinfo.value.cancelled == (BackgroundJobMetadata("with_nursery"),)
    assert all_counts(excinfo.value.statistics) == expected(cancelled=1)
    assert [r.getMessage() for r in records(caplog, logging.WARNING)] == [
        "background job 'with_nursery' cancelled at shutdown"
    ]
    assert not records(caplog, logging.ERROR)


@pytest.mark.parametrize(("depth", "strict"), SHAPES)
async def test_error_raised_during_cleanup_at_the_cut_off_is_logged_and_the_report_raised(
    depth: int,
    strict: bool,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = BackgroundTaskConfig(drain_timeout=1.0)
    with pytest.raises(BackgroundShutdownError) as excinfo:
        async with open_background_runtime(config) as runtime:
            runtime.handle().spawn(nested(depth, raises_in_cleanup, strict=strict), name="j")
    assert all_counts(excinfo.value.statistics) == expected(cancelled=1)
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == "background job 'j' raised an error while being cancelled"
    assert error.exc_info is not None
    leaves = _leaves(error.exc_info[1])
    assert [type(e) for e in leaves] == [ValueError]


def _leaves(exc: BaseException | None) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [] if exc is None else [exc]


# -- cut off because the body raised or was cancelled ------------------------------------------


@pytest.mark.parametrize(("depth", "strict"), SHAPES)
async def test_body_error_leaves_unchanged_when_a_nursery_job_is_cut_off(
    depth: int,
    strict: bool,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = KeyError("body")
    with pytest.raises(KeyError) as excinfo:
        async with open_background_runtime() as runtime:
            runtime.handle().spawn(nested(depth, raises_in_cleanup, strict=strict), name="j")
            await trio.sleep(1)
            raise error
    assert excinfo.value is error
    assert all_counts(runtime.statistics()) == expected(cancelled=1)
    assert [r.getMessage() for r in records(caplog, logging.WARNING)] == [
        "background job 'j' cancelled at shutdown"
    ]


@pytest.mark.parametrize(("depth", "strict"), SHAPES)
async def test_body_cancelled_from_outside_leaves_as_a_bare_cancelled(
    depth: int, strict: bool, autojump_clock: trio.testing.MockClock
) -> None:
    outcome: list[BaseException] = []
    with trio.move_on_after(1):
        try:
            async with open_background_runtime() as runtime:
                runtime.handle().spawn(nested(depth, trio.sleep_forever, strict=strict))
                await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
            raise
    [left] = outcome
    assert type(left) is trio.Cancelled
    assert all_counts(runtime.statistics()) == expected(cancelled=1)


async def test_cancelled_aclose_cuts_off_a_nursery_job_and_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_background_runtime() as runtime:
        runtime.handle().spawn(nested(1, trio.sleep_forever), name="j")
        with trio.move_on_after(1) as scope:
            await runtime.aclose()
        assert scope.cancelled_caught
        assert all_counts(runtime.statistics()) == expected(cancelled=1)


# -- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "strict"), SHAPES)
async def test_nursery_job_past_its_timeout_counts_timed_out(
    depth: int,
    strict: bool,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_background_runtime() as runtime:
        runtime.handle().spawn(
            nested(depth, trio.sleep_forever, strict=strict), timeout=2, name="j"
        )
        await runtime.wait_idle()
    assert trio.current_time() == 2
    assert all_counts(runtime.statistics()) == expected(timed_out=1)
    assert [r.getMessage() for r in records(caplog, logging.WARNING)] == [
        "background job 'j' timed out after 2 seconds"
    ]


# -- a Cancelled the runtime did not cause is the job's own failure --------------------------


async def test_a_jobs_own_leaked_cancel_scope_fails_that_job_only(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    async def leaks() -> None:
        scope = trio.CancelScope()
        scope.__enter__()  # never exited: the job's Cancelled escapes it
        scope.cancel()
        await trio.sleep(1)

    async def next_job() -> None:
        await trio.sleep(1)
        ran.append("next")

    config = BackgroundTaskConfig(max_concurrent_tasks=1)
    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(leaks)
        handle.spawn(next_job)
        await runtime.wait_idle()
        # The runtime is still open and working.
        handle.spawn(next_job)
    assert ran == ["next", "next"]
    assert all_counts(runtime.statistics()) == expected(failed=1, completed=2)
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage().endswith(".<locals>.leaks' failed")


async def test_a_cancelled_the_job_raises_itself_is_its_failure_not_a_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def raises_foreign_cancelled() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.sleep(1)
            except trio.Cancelled as exc:
                stray = exc
        raise stray  # outside its scope: nobody catches it

    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        handle.spawn(raises_foreign_cancelled)
        await runtime.wait_idle()
        handle.spawn(trio.sleep, 1)
        assert not runtime.statistics().closed
    assert all_counts(runtime.statistics()) == expected(failed=1, completed=1)


# -- KeyboardInterrupt and SystemExit ------------------------------------------------------------


async def test_system_exit_leaves_with_its_cause_and_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cause = OSError("disk")
    exit_ = SystemExit(3)

    async def dies() -> None:
        try:
            raise KeyError("context")
        except KeyError:
            raise exit_ from cause

    with pytest.raises(SystemExit) as excinfo:
        async with open_background_runtime() as runtime:
            runtime.handle().spawn(dies)
            await trio.sleep_forever()
    assert excinfo.value is exit_
    assert exit_.__cause__ is cause
    assert isinstance(exit_.__context__, KeyError)
    s = runtime.statistics()
    assert (s.queued, s.running, s.failed) == (0, 0, 1)


async def test_keyboard_interrupt_from_a_nursery_child_leaves_the_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    interrupt = KeyboardInterrupt()

    async def child() -> None:
        await trio.sleep(1)
        raise interrupt

    with pytest.raises(BaseExceptionGroup) as excinfo:
        async with open_background_runtime() as runtime:
            runtime.handle().spawn(nested(1, child))
            runtime.handle().spawn(trio.sleep_forever)
            await trio.sleep_forever()
    # The group the job's nursery raised, its Cancelled siblings removed, nothing flattened.
    assert _leaves(excinfo.value) == [interrupt]
    s = runtime.statistics()
    assert (s.queued, s.running, s.failed, s.cancelled) == (0, 0, 1, 1)


async def test_exception_groups_keep_every_member_in_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = ValueError("a"), KeyError("b")

    async def raises(exc: BaseException) -> None:
        raise exc

    async def job() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raises, a)
            nursery.start_soon(raises, b)

    async with open_background_runtime() as runtime:
        runtime.handle().spawn(job)
    [error] = records(caplog, logging.ERROR)
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], ExceptionGroup)
    assert set(map(id, _leaves(error.exc_info[1]))) == {id(a), id(b)}


# -- every job in its own task and context ---------------------------------------------------------

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST", default="-")


class StampRequest(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx_request = REQUEST.get()
        return True


async def test_log_records_and_hooks_of_a_job_run_in_its_own_context(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str, str]] = []

    class Hooks:
        def job_accepted(self, job: BackgroundJobMetadata) -> None:
            seen.append(("accepted", job.name, REQUEST.get()))

        def job_started(self, job: BackgroundJobMetadata) -> None:
            seen.append(("started", job.name, REQUEST.get()))

        def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
            seen.append(("finished", job.name, REQUEST.get()))

    async def a() -> None:
        REQUEST.set("A-mutated")
        await trio.sleep(1)

    async def b() -> None:
        await trio.sleep(1)
        raise ValueError("b failed")

    stamp = StampRequest()
    logging.getLogger("trio_background").addFilter(stamp)
    try:
        config = BackgroundTaskConfig(max_concurrent_tasks=1)
        async with open_background_runtime(config, instruments=[Hooks()]) as runtime:
            handle = runtime.handle()
            REQUEST.set("A")
            handle.spawn(a, name="a")
            REQUEST.set("B")
            handle.spawn(b, name="b")
            REQUEST.set("body")
    finally:
        logging.getLogger("trio_background").removeFilter(stamp)
    assert sorted(seen) == sorted(
        [
            ("accepted", "a", "A"),
            ("accepted", "b", "B"),
            ("started", "a", "A"),
            ("finished", "a", "A-mutated"),
            ("started", "b", "B"),
            ("finished", "b", "B"),
        ]
    )
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == "background job 'b' failed"
    assert error.ctx_request == "B"  # type: ignore[attr-defined]


async def test_consecutive_jobs_in_one_slot_share_no_task_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks: list[trio.lowlevel.Task] = []
    values: list[str] = []
    lock = trio.Lock()

    async def a() -> None:
        tasks.append(trio.lowlevel.current_task())
        REQUEST.set("A")
        await lock.acquire()  # never released: held by A's task
        scope = trio.CancelScope()
        scope.__enter__()  # leaked
        scope.cancel()

    async def b() -> None:
        task = trio.lowlevel.current_task()
        tasks.append(task)
        values.append(task.context.get(REQUEST, "-"))
        values.append(REQUEST.get())
        await trio.sleep(1)  # not cancelled by A's leaked scope
        # A's task has ended, so Trio reports its lock broken (as for any task of its own).
        with pytest.raises(trio.BrokenResourceError):
            await lock.acquire()
        values.append("b done")

    config = BackgroundTaskConfig(max_concurrent_tasks=1)
    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(a)
        handle.spawn(b)
    assert tasks[0] is not tasks[1]
    assert values == ["-", "-", "b done"]
    assert runtime.statistics().completed == 2
