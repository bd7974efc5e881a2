"""Running one job: how it ended, whatever shape its code gives it, and in which context.

Outcomes (completed, failed, timed out, cancelled), what is logged for each, the shapes a
runtime-caused `trio.Cancelled` takes inside a job's nurseries, timeouts, jobs that raise
KeyboardInterrupt or SystemExit, and the context and task every job runs in.
"""

from __future__ import annotations

import contextvars
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

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
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundRuntime,
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


def raising_in_cleanup(error: BaseException) -> Job:
    """A job that sleeps until cancelled, then raises ``error`` from its ``finally``."""

    async def job() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise error

    return job


def _leaves(exc: BaseException | None) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [] if exc is None else [exc]


# Non-strict nurseries are deprecated, but still in use: they must be counted right too.
NON_STRICT = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")
SHAPES = [
    pytest.param(0, True, id="bare"),
    pytest.param(1, True, id="nursery"),
    pytest.param(2, True, id="nursery-in-nursery"),
    pytest.param(1, False, id="nursery-non-strict", marks=NON_STRICT),
    pytest.param(2, False, id="nursery-in-nursery-non-strict", marks=NON_STRICT),
]


# -- a job fails ----------------------------------------------------------------------------


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
        assert counts(runtime) == {"completed": 1, "failed": 1}
    assert all_counts(runtime.statistics()) == expected(completed=1, failed=1)
    [error] = records(caplog, logging.ERROR)
    assert exc_of(error) is boom
    assert error.getMessage() == "background job 'fails' failed (request_id='r-1')"
    assert error.__dict__["job_name"] == "fails"
    assert error.__dict__["request_id"] == "r-1"
    # The traceback is in the log output.
    assert "Traceback" in caplog.text
    assert "ValueError: boom" in caplog.text
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
    assert error.getMessage() == f"background job {fails.__qualname__!r} failed (request_id='r-2')"
    assert error.__dict__["job_name"] == fails.__qualname__
    assert error.__dict__["request_id"] == "r-2"
    assert records(caplog, logging.WARNING) == []


async def test_job_raises_exception_group(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = KeyError("a"), OSError("b")

    async def raise_now(exc: Exception) -> None:
        raise exc  # in the task's first step, before any checkpoint: both raise

    async def fails_twice() -> None:
        await trio.sleep(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raise_now, a)
            nursery.start_soon(raise_now, b)

    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        handle.spawn(fails_twice, name="group")
        handle.spawn(sleeper, 3.0, name="bystander")
    assert trio.current_time() == 3.0
    assert all_counts(runtime.statistics()) == expected(completed=1, failed=1)
    [error] = records(caplog, logging.ERROR)
    group = exc_of(error)
    assert isinstance(group, ExceptionGroup)
    assert type(group).__name__ == "ExceptionGroup"
    # Every member is in the log, the very objects raised, none flattened away.
    assert sorted(map(id, group.exceptions)) == sorted([id(a), id(b)])
    assert error.__dict__["job_name"] == "group"
    assert records(caplog, logging.WARNING) == []


async def test_job_is_not_an_async_function(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def not_async(x: int) -> None:
        calls.append(x)

    async with open_background_runtime() as runtime:
        # Accepted (it is callable), but fails when it starts: it returned no coroutine.
        runtime.handle().spawn(cast(Any, not_async), 7, name="sync")
        assert calls == []  # not called at submit
        await runtime.wait_idle()
        assert calls == [7]  # called when the job started
        assert counts(runtime) == {"failed": 1}
    assert all_counts(runtime.statistics()) == expected(failed=1)
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == "background job 'sync' failed"
    assert error.__dict__["job_name"] == "sync"
    exc = exc_of(error)
    assert type(exc) is TypeError
    assert str(exc) == (
        "background job 'sync' did not return a coroutine (got NoneType): jobs must be async "
        "functions; to run a blocking function, submit trio.to_thread.run_sync and the function"
    )


# -- a Cancelled the runtime did not cause is the job's own failure -------------------------


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


# -- cancelled by the runtime, in every shape -----------------------------------------------


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
    assert messages(caplog, logging.WARNING) == [
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
    cleanup_failed = ValueError("cleanup failed")
    config = BackgroundTaskConfig(drain_timeout=1.0)
    job = nested(depth, raising_in_cleanup(cleanup_failed), strict=strict)
    with pytest.raises(BackgroundShutdownError) as excinfo:
        async with open_background_runtime(config) as runtime:
            runtime.handle().spawn(job, name="j", request_id="r-j")
    assert trio.current_time() == 1.0
    final = runtime.statistics()
    # Running at the cut-off, so `cancelled` -- whatever it raised afterwards.
    assert all_counts(final) == expected(cancelled=1)
    assert excinfo.value.cancelled == (meta("j", "r-j"),)
    assert excinfo.value.dropped == ()
    assert excinfo.value.statistics == final
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == (
        "background job 'j' raised an error while being cancelled (request_id='r-j')"
    )
    assert error.__dict__["job_name"] == "j"
    assert error.__dict__["request_id"] == "r-j"
    # The very error, in whatever groups the job's nurseries put it, the Cancelled taken out.
    assert _leaves(exc_of(error)) == [cleanup_failed]
    if depth == 0:
        assert exc_of(error) is cleanup_failed
    assert messages(caplog, logging.WARNING) == [
        "background job 'j' cancelled at shutdown (request_id='r-j')"
    ]


@pytest.mark.parametrize(("depth", "strict"), SHAPES)
async def test_body_error_leaves_unchanged_when_a_nursery_job_is_cut_off(
    depth: int,
    strict: bool,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = KeyError("body")
    job = nested(depth, raising_in_cleanup(ValueError("cleanup failed")), strict=strict)
    with pytest.raises(KeyError) as excinfo:
        async with open_background_runtime() as runtime:
            runtime.handle().spawn(job, name="j")
            await trio.sleep(1)
            raise error
    assert excinfo.value is error
    assert all_counts(runtime.statistics()) == expected(cancelled=1)
    assert messages(caplog, logging.WARNING) == ["background job 'j' cancelled at shutdown"]


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


# -- timeouts -------------------------------------------------------------------------------


async def test_job_times_out(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The config's job_timeout is the default; a job's own timeout overrides it, downwards
    # or upwards, and math.inf means no limit at all (for spawn and send alike).
    recorder = Recorder()
    config = BackgroundTaskConfig(job_timeout=3.0)
    cancelled_at: list[float] = []

    async def own_limit() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            raise

    async with open_background_runtime(config, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        handle.spawn(trio.sleep_forever, name="default_limit", request_id="r-t")
        handle.spawn(own_limit, name="own_limit", timeout=1.5)
        handle.spawn(sleeper, 2.0, name="in_time")
        handle.spawn(sleeper, 4.0, name="longer", timeout=5.0)
        handle.spawn(sleeper, 1e6, name="unlimited", timeout=math.inf)
        await handle.send(sleeper, 2e6, name="unlimited_sent", timeout=math.inf)
        await runtime.wait_idle()
        assert trio.current_time() == 2e6
    assert cancelled_at == [1.5]
    assert all_counts(runtime.statistics()) == expected(completed=4, timed_out=2)
    assert sorted(recorder.of("finished")) == [
        ("finished", "default_limit", "timed_out", 3.0),
        ("finished", "in_time", "completed", 2.0),
        ("finished", "longer", "completed", 4.0),
        ("finished", "own_limit", "timed_out", 1.5),
        ("finished", "unlimited", "completed", 1e6),
        ("finished", "unlimited_sent", "completed", 2e6),
    ]
    assert messages(caplog, logging.WARNING) == [
        "background job 'own_limit' timed out after 1.5 seconds",
        "background job 'default_limit' timed out after 3 seconds (request_id='r-t')",
    ]
    warnings = records(caplog, logging.WARNING)
    assert {r.__dict__["job_name"]: r.__dict__["request_id"] for r in warnings} == {
        "default_limit": "r-t",
        "own_limit": None,
    }
    assert records(caplog, logging.ERROR) == []


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
    assert messages(caplog, logging.WARNING) == ["background job 'j' timed out after 2 seconds"]


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


# -- KeyboardInterrupt and SystemExit -------------------------------------------------------


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
    cancelled: list[str] = []
    ran: list[str] = []

    async def runs(label: str) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(label)
            raise

    async def queued(label: str) -> None:
        ran.append(label)  # pragma: no cover (never runs)

    async def dies() -> None:
        await trio.sleep(1)
        raise fatal

    opened: list[BackgroundRuntime] = []

    async def scenario() -> None:
        async with open_background_runtime(config, instruments=[recorder]) as runtime:
            opened.append(runtime)
            handle = runtime.handle()
            handle.spawn(runs, "a", name="a")
            handle.spawn(dies, name="dies")
            handle.spawn(queued, "c", name="c")
            handle.spawn(queued, "d", name="d")
            if phase == "body":
                await trio.sleep(100)  # cancelled by the runtime at t=1

    with pytest.raises(BaseException) as excinfo:  # noqa: PT011 (checked exactly below)
        await scenario()
    # The very exception, bare: not wrapped in an ExceptionGroup.
    assert excinfo.value is fatal
    assert trio.current_time() == 1.0
    # The running job was really cancelled, the queued ones never ran.
    assert cancelled == ["a"]
    assert ran == []
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


# -- every job in its own context and task --------------------------------------------------

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST", default="-")


async def test_job_runs_in_the_context_its_submitter_had_at_submit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=10, max_concurrent_tasks=1)
    seen: list[tuple[str, str]] = []
    gate = trio.Event()

    async def job(label: str) -> None:
        seen.append((label, REQUEST.get()))

    async def first() -> None:
        seen.append(("first", REQUEST.get()))
        await gate.wait()

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        REQUEST.set("value-first")
        handle.spawn(first)  # takes the slot at once
        for label in ("q1", "q2", "q3"):
            # Changed before first's task ever ran, and before each queued job starts.
            REQUEST.set(f"value-{label}")
            handle.spawn(job, label)
        REQUEST.set("later")
        assert runtime.statistics().queued == 3
        gate.set()
        await runtime.wait_idle()
    # Not the dispatcher's context, not another job's, not the submitter's later value.
    assert seen == [
        ("first", "value-first"),
        ("q1", "value-q1"),
        ("q2", "value-q2"),
        ("q3", "value-q3"),
    ]


async def test_a_waiting_send_runs_its_job_in_its_own_submitters_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=0, max_concurrent_tasks=1)
    seen: dict[str, str] = {}

    async def job(label: str) -> None:
        seen[label] = REQUEST.get()
        await trio.sleep(1)

    async with open_background_runtime(config) as runtime:

        async def submitter(label: str) -> None:
            REQUEST.set(f"ctx-{label}")
            # With max_queue_size=0 all but the first wait in send(); each job must still
            # run in its own submitter's context, not the task that freed the slot.
            await runtime.handle().send(job, label)

        async with trio.open_nursery() as nursery:
            for label in ("x", "y", "z"):
                nursery.start_soon(submitter, label)
        await runtime.wait_idle()
    assert seen == {"x": "ctx-x", "y": "ctx-y", "z": "ctx-z"}


async def test_jobs_sharing_a_slot_keep_their_own_contexts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With one slot, jobs run one after another; what each sets in its context is seen
    # by itself and the tasks it starts, never by the next job or by the submitter.
    seen: list[tuple[str, str, str, str]] = []

    async def job(label: str) -> None:
        before = REQUEST.get()
        REQUEST.set(f"set-by-{label}")
        child: list[str] = []

        async def read_in_child() -> None:
            child.append(REQUEST.get())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_in_child)
        await trio.sleep(1)
        seen.append((label, before, child[0], REQUEST.get()))

    async with open_background_runtime(BackgroundTaskConfig(max_concurrent_tasks=1)) as runtime:
        handle = runtime.handle()
        for label in ("a", "b", "c"):
            REQUEST.set(f"submitted-{label}")
            handle.spawn(job, label)
        REQUEST.set("submitter-after")
        await trio.testing.wait_all_tasks_blocked()  # "a" has set its own value
        assert REQUEST.get() == "submitter-after"
        await runtime.wait_idle()
        assert REQUEST.get() == "submitter-after"
    assert seen == [
        ("a", "submitted-a", "set-by-a", "set-by-a"),
        ("b", "submitted-b", "set-by-b", "set-by-b"),
        ("c", "submitted-c", "set-by-c", "set-by-c"),
    ]
    assert trio.current_time() == 3


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


async def test_keyboard_interrupt_during_cleanup_at_the_cut_off_counts_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    interrupt = KeyboardInterrupt("during cleanup")

    async def child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise interrupt

    async def job() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            await trio.sleep_forever()

    with trio.fail_after(10), pytest.raises(BaseException) as excinfo:  # noqa: PT011
        async with open_background_runtime(BackgroundTaskConfig(drain_timeout=1)) as runtime:
            runtime.handle().spawn(job)
    assert interrupt in _leaves(excinfo.value)
    assert all_counts(runtime.statistics()) == expected(cancelled=1)


class _RaisingGetattr:
    """A callable whose ``__getattr__`` raises KeyError (a dict-backed proxy)."""

    def __init__(self) -> None:
        self._d: dict[str, object] = {}

    def __getattr__(self, name: str) -> object:
        return self._d[name]

    async def __call__(self) -> None:
        raise ValueError("job failed")


async def test_a_callable_whose_getattr_raises_is_named_after_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_background_runtime() as runtime:
        runtime.handle().spawn(_RaisingGetattr())
    assert all_counts(runtime.statistics()) == expected(failed=1)
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == "background job '_RaisingGetattr' failed"
