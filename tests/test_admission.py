"""Admission: spawn/send accept a job completely or not at all, in order, from the right thread.

Every bad argument and every call from a foreign thread is made against a busy runtime
(`assert_refused`), proving that nothing was accepted or counted: ``statistics()`` is equal
before and after the bad call, no instrument hook fired, and after the drain exactly the
legitimate jobs ran. Calls refused because shutdown began prove the same in their own way.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from helpers import Recorder, all_counts, counts, exc_of, expected, records, sleeper

from trio_background import (
    BackgroundHandle,
    BackgroundJobMetadata,
    BackgroundSpawnError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)

# Two slots and room for four queued jobs: the refusal scenario keeps two jobs
# running and one queued, so an accidental acceptance would show in any counter.
CONFIG = BackgroundTaskConfig(max_queue_size=4, max_concurrent_tasks=2, drain_timeout=5.0)


async def submit(handle: BackgroundHandle, method: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call ``handle.spawn`` or ``await handle.send`` with arguments mypy would refuse."""
    if method == "spawn":
        handle.spawn(fn, *args, **kwargs)
    else:
        await handle.send(fn, *args, **kwargs)


async def assert_refused(
    attempt: Callable[[BackgroundHandle], Awaitable[object]],
    error: type[BaseException],
    pattern: str,
) -> BaseException:
    """Run ``attempt`` against a busy runtime and prove it was refused without a trace.

    The runtime has two running jobs and one queued job when ``attempt`` runs.
    The attempt must raise ``error`` matching ``pattern``; statistics and
    instrument calls must be exactly what they were; and after the runtime has
    drained, exactly the three legitimate jobs ran.
    """
    recorder = Recorder()
    release = trio.Event()
    async with open_background_runtime(CONFIG, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        for _ in range(3):
            handle.spawn(release.wait, name="legit")
        await trio.testing.wait_all_tasks_blocked()
        before = runtime.statistics()
        assert all_counts(before) == expected(running=2, queued=1)
        calls_before = list(recorder.calls)
        with pytest.raises(error, match=pattern) as excinfo:
            await attempt(handle)
        assert runtime.statistics() == before
        assert recorder.calls == calls_before
        release.set()
    final = runtime.statistics()
    assert all_counts(final) == expected(completed=3)
    assert final.accepted == 3
    accepted = [call for call in recorder.pairs() if call[0] == "accepted"]
    assert accepted == [("accepted", "legit")] * 3
    return excinfo.value


# -- spawn is atomic ------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RecursionError, MemoryError])
async def test_spawn_is_atomic_when_starting_the_task_fails(
    error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trio.Nursery.start_soon
    failing = False

    def start_soon(self: trio.Nursery, *args: Any, **kwargs: Any) -> None:
        if failing:
            raise error("inside Trio")
        real(self, *args, **kwargs)

    monkeypatch.setattr(trio.Nursery, "start_soon", start_soon)
    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        before = runtime.statistics()
        failing = True
        with pytest.raises(error, match=r"^inside Trio$"):
            handle.spawn(sleeper, 1)
        failing = False
        assert runtime.statistics() == before
        # No slot was kept: the runtime still takes and runs jobs, and closes.
        handle.spawn(sleeper, 0)
        await runtime.wait_idle()
    assert all_counts(runtime.statistics()) == expected(completed=1)


# -- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "send"])
async def test_submit_rejects_coroutine_object(method: str) -> None:
    coro = sleeper(1.0)
    try:
        await assert_refused(
            lambda handle: submit(handle, method, coro),
            TypeError,
            rf"^{method}\(\) expects an async function, not a coroutine object: pass the "
            rf"function and its arguments separately, e\.g\. {method}\(fn, arg\) instead of "
            rf"{method}\(fn\(arg\)\)$",
        )
        # The runtime closed it: no "coroutine ... was never awaited" warning follows.
        assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"
    finally:
        coro.close()  # in case it did not: keep the warning out of other tests


@pytest.mark.parametrize("method", ["spawn", "send"])
@pytest.mark.parametrize(
    ("fn", "type_name"),
    [(5, "int"), ("sleeper", "str"), (None, "NoneType"), ([sleeper], "list")],
)
async def test_submit_rejects_non_callable(method: str, fn: object, type_name: str) -> None:
    await assert_refused(
        lambda handle: submit(handle, method, fn),
        TypeError,
        rf"^{method}\(\) expects an async function, not {type_name}$",
    )


@pytest.mark.parametrize("method", ["spawn", "send"])
@pytest.mark.parametrize(
    ("fn", "label"),
    [
        (time.sleep, "sleep"),
        (functools.partial(time.sleep, 1), "sleep"),
        (print, "print"),
        ([].append, "list.append"),
    ],
)
async def test_submit_rejects_builtins_with_the_to_thread_hint(
    method: str, fn: object, label: str
) -> None:
    message = (
        f"{method}() expects an async function, not the builtin {label!r}, which would block "
        f"the event loop: to run blocking work in a thread, write "
        f"{method}(trio.to_thread.run_sync, {label}, *args)"
    )
    await assert_refused(
        lambda handle: submit(handle, method, fn), TypeError, rf"^{re.escape(message)}$"
    )


@pytest.mark.parametrize("method", ["spawn", "send"])
async def test_submit_rejects_classes(method: str) -> None:
    class Job:
        async def __call__(self) -> None:
            pass

    message = (
        f"{method}() expects an async function, not the class {Job.__qualname__!r}: "
        f"pass an async function that creates and uses it (to run blocking work in a "
        f"thread, write {method}(trio.to_thread.run_sync, fn, *args))"
    )
    await assert_refused(
        lambda handle: submit(handle, method, Job), TypeError, rf"^{re.escape(message)}$"
    )
    # The control: an instance with an async __call__ is fine.
    async with open_background_runtime() as runtime:
        await submit(runtime.handle(), method, Job())
    assert all_counts(runtime.statistics()) == expected(completed=1)


@pytest.mark.parametrize("method", ["spawn", "send"])
@pytest.mark.parametrize(
    ("field", "value", "type_name"),
    [
        ("name", 5, "int"),
        ("name", b"job", "bytes"),
        ("request_id", 5, "int"),
        ("request_id", ["r"], "list"),
    ],
)
async def test_submit_rejects_non_str_name_or_request_id(
    method: str, field: str, value: object, type_name: str
) -> None:
    kwargs: dict[str, Any] = {field: value}
    await assert_refused(
        lambda handle: submit(handle, method, sleeper, 1.0, **kwargs),
        TypeError,
        rf"^{field} must be a str or None, not {type_name}$",
    )


@pytest.mark.parametrize("method", ["spawn", "send"])
@pytest.mark.parametrize(("value", "type_name"), [("1", "str"), (True, "bool"), ([1], "list")])
async def test_submit_rejects_timeout_of_wrong_type(
    method: str, value: object, type_name: str
) -> None:
    error = await assert_refused(
        lambda handle: submit(handle, method, sleeper, 1.0, timeout=value),
        TypeError,
        rf"^timeout must be a number or None, not {type_name}$",
    )
    assert not isinstance(error, ValueError)


@pytest.mark.parametrize("method", ["spawn", "send"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, r"timeout must be > 0, got 0"),
        (0.0, r"timeout must be > 0, got 0\.0"),
        (-1, r"timeout must be > 0, got -1"),
        (-0.5, r"timeout must be > 0, got -0\.5"),
        (-math.inf, r"timeout must be > 0, got -inf"),
        (math.nan, r"timeout must not be NaN"),
        pytest.param(
            10**400,
            r"timeout is too large for a number of seconds \(it does not fit in a float\); "
            r"use math\.inf for no limit",
            id="int-too-large-for-a-float",
        ),
    ],
)
async def test_submit_rejects_timeout_out_of_range(method: str, value: float, message: str) -> None:
    # A plain ValueError, as for the config (not a private class that is also a TypeError,
    # nor the OverflowError of float(10**400)).
    error = await assert_refused(
        lambda handle: submit(handle, method, sleeper, 1.0, timeout=value),
        ValueError,
        rf"^{message}$",
    )
    assert type(error) is ValueError


# -- order and backpressure -----------------------------------------------------------------


async def test_fifo_with_one_slot(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=100, max_concurrent_tasks=1)
    started: list[tuple[int, float]] = []
    t0 = trio.current_time()

    async def job(i: int) -> None:
        started.append((i, trio.current_time() - t0))
        await trio.sleep(0.25 * (i % 3))

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        for i in range(12):
            if i % 2:
                await handle.send(job, i)
            else:
                handle.spawn(job, i)
        await runtime.wait_idle()
    assert [i for i, _ in started] == list(range(12))
    expected_at = 0.0
    for i, at in started:
        assert at == expected_at
        expected_at += 0.25 * (i % 3)


async def test_send_waits_while_full_fifo(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=1, max_concurrent_tasks=1)
    started: list[str] = []
    returned: list[tuple[str, float]] = []
    t0 = trio.current_time()

    async def job(label: str) -> None:
        started.append(label)
        await trio.sleep(1)

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        handle.spawn(job, "a")  # running until 1
        handle.spawn(job, "b")  # queued
        with pytest.raises(QueueFullError, match=r"^background task queue is full$"):
            handle.spawn(job, "x")

        async def sender(label: str) -> None:
            await handle.send(job, label)
            returned.append((label, trio.current_time() - t0))

        async with trio.open_nursery() as nursery:
            for label in ("c", "d", "e"):
                nursery.start_soon(sender, label)
                await trio.testing.wait_all_tasks_blocked()
            assert returned == []
            stats = runtime.statistics()
            assert (stats.running, stats.queued, stats.accepted, stats.rejected) == (1, 1, 2, 1)
        # Each waiting send was accepted the instant room appeared, in arrival order.
        assert returned == [("c", 1.0), ("d", 2.0), ("e", 3.0)]
        await runtime.wait_idle()
    assert started == ["a", "b", "c", "d", "e"]
    assert counts(runtime) == {"completed": 5, "rejected": 1}


async def test_send_with_zero_queue(autojump_clock: trio.testing.MockClock) -> None:
    config = BackgroundTaskConfig(max_queue_size=0, max_concurrent_tasks=1)
    events: list[tuple[str, float]] = []
    t0 = trio.current_time()

    async def job(label: str) -> None:
        events.append((f"start {label}", trio.current_time() - t0))
        await trio.sleep(1.5)

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        await handle.send(job, "a")  # a slot is free: starts at once
        assert counts(runtime) == {"running": 1}
        with pytest.raises(QueueFullError, match=r"^background task queue is full$"):
            handle.spawn(job, "rejected")
        await handle.send(job, "b")  # waits until a's slot frees
        events.append(("send b returned", trio.current_time() - t0))
        assert counts(runtime) == {"running": 1, "completed": 1, "rejected": 1}
        await runtime.wait_idle()
    # b's first step and the return from send() happen in the same batch, in either order.
    assert events[0] == ("start a", 0.0)
    assert sorted(events[1:]) == [("send b returned", 1.5), ("start b", 1.5)]
    assert counts(runtime) == {"completed": 2, "rejected": 1}


async def test_send_is_a_checkpoint_and_cancellable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BackgroundTaskConfig(max_queue_size=0, max_concurrent_tasks=1)
    ran: list[str] = []

    async def job(label: str) -> None:
        ran.append(label)
        await trio.sleep(1)

    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        with trio.CancelScope() as scope:
            scope.cancel()
            await handle.send(job, "cancelled-before")
        assert scope.cancelled_caught
        assert runtime.statistics().accepted == 0

        handle.spawn(job, "a")
        with trio.move_on_after(0.5) as scope:
            await handle.send(job, "cancelled-while-waiting")
        assert scope.cancelled_caught
        await runtime.wait_idle()
        assert trio.current_time() == 1.0
    assert ran == ["a"]
    assert counts(runtime) == {"completed": 1}


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


# -- after shutdown began -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "send"])
async def test_submit_after_aclose_raises_runtime_closed(
    method: str, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = Recorder()
    async with open_background_runtime(CONFIG, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        handle.spawn(sleeper, 1.0, name="before")
        await runtime.aclose()
        assert trio.current_time() == 1.0
        after_close = runtime.statistics()
        assert after_close.closed
        assert all_counts(after_close) == expected(completed=1)
        calls = list(recorder.calls)
        with pytest.raises(RuntimeClosedError, match=r"^background runtime is closed$") as excinfo:
            await submit(handle, method, sleeper, 1.0)
        # Closed is not full: a different error, and not counted as rejected.
        assert isinstance(excinfo.value, BackgroundSpawnError)
        assert not isinstance(excinfo.value, QueueFullError)
        with pytest.raises(RuntimeClosedError, match=r"^background runtime is closed$"):
            await submit(runtime.handle(), method, sleeper, 1.0)  # a fresh handle too
        assert runtime.statistics() == after_close
        assert recorder.calls == calls
    assert runtime.statistics() == after_close
    assert trio.current_time() == 1.0


@pytest.mark.parametrize("method", ["spawn", "send"])
async def test_submit_after_block_exit_raises_runtime_closed(method: str) -> None:
    recorder = Recorder()
    async with open_background_runtime(CONFIG, instruments=[recorder]) as runtime:
        handle = runtime.handle()
    final = runtime.statistics()
    assert final.closed
    assert all_counts(final) == expected()
    with pytest.raises(RuntimeClosedError, match=r"^background runtime is closed$"):
        await submit(handle, method, sleeper, 1.0)
    assert runtime.statistics() == final
    assert recorder.calls == []


async def test_waiting_send_is_refused_when_shutdown_begins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    config = BackgroundTaskConfig(max_queue_size=0, max_concurrent_tasks=1, drain_timeout=60.0)
    errors: list[BaseException] = []
    async with open_background_runtime(config, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        handle.spawn(sleeper, 10.0, name="busy")

        async def waiting_sender() -> None:
            try:
                await handle.send(sleeper, 1.0, name="waiting")
            except RuntimeClosedError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting_sender)
            await trio.testing.wait_all_tasks_blocked()
            before = runtime.statistics()
            assert all_counts(before) == expected(running=1)
            calls = list(recorder.calls)
            nursery.start_soon(runtime.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert [str(e) for e in errors] == ["background runtime is closed"]
            assert trio.current_time() == 0.0
            assert runtime.statistics() == attrs.evolve(before, closed=True)
            assert recorder.calls == calls
    assert trio.current_time() == 10.0
    assert all_counts(runtime.statistics()) == expected(completed=1)
    assert [name for hook, name in recorder.pairs() if hook == "accepted"] == ["busy"]


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


# -- the thread rule ------------------------------------------------------------------------


def foreign_thread_message(method: str) -> str:
    """The exact message of a spawn()/send() called from a foreign thread, as a pattern."""
    message = (
        f"{method}() must be called from the runtime's Trio thread; from another thread "
        f"use trio.from_thread.run_sync(handle.{method}, ...)"
    )
    return rf"^{re.escape(message)}$"


async def test_spawn_from_foreign_thread_is_refused() -> None:
    def in_thread(handle: BackgroundHandle) -> None:
        handle.spawn(sleeper, 1.0)

    await assert_refused(
        lambda handle: trio.to_thread.run_sync(in_thread, handle),
        RuntimeError,
        foreign_thread_message("spawn"),
    )


async def test_spawn_from_another_trio_run_is_refused() -> None:
    # Another Trio loop in another thread is just as foreign as a plain thread.
    async def in_other_loop(handle: BackgroundHandle) -> None:
        handle.spawn(sleeper, 1.0)

    await assert_refused(
        lambda handle: trio.to_thread.run_sync(trio.run, in_other_loop, handle),
        RuntimeError,
        foreign_thread_message("spawn"),
    )


async def test_send_from_another_trio_run_is_refused() -> None:
    async def in_other_loop(handle: BackgroundHandle) -> None:
        await handle.send(sleeper, 1.0)

    await assert_refused(
        lambda handle: trio.to_thread.run_sync(trio.run, in_other_loop, handle),
        RuntimeError,
        foreign_thread_message("send"),
    )


async def test_from_thread_run_sync_is_the_way_in() -> None:
    # The control for the three tests above: the advised call is accepted, with its
    # positional arguments passed through, or through a partial that names the job.
    recorder = Recorder()
    ran: list[int] = []

    async def job(n: int) -> None:
        ran.append(n)

    async with open_background_runtime(CONFIG, instruments=[recorder]) as runtime:
        handle = runtime.handle()

        def in_thread() -> None:
            trio.from_thread.run_sync(handle.spawn, job, 2)
            trio.from_thread.run_sync(functools.partial(handle.spawn, job, 3, name="three"))

        await trio.to_thread.run_sync(in_thread)
        await runtime.wait_idle()
        assert sorted(ran) == [2, 3]
    assert all_counts(runtime.statistics()) == expected(completed=2)
    for name in (job.__qualname__, "three"):
        hooks = [hook for hook, job_name in recorder.pairs() if job_name == name]
        assert hooks == ["accepted", "started", "finished"], name


def test_runtime_belongs_to_the_thread_that_enters_the_block() -> None:
    manager = open_background_runtime()  # created in this thread
    results: list[BackgroundStatistics] = []

    async def main() -> None:
        async with manager as runtime:
            runtime.handle().spawn(sleeper, 0)
            await runtime.wait_idle()
        results.append(runtime.statistics())

    thread = threading.Thread(target=trio.run, args=(main,))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    [stats] = results
    assert all_counts(stats) == expected(completed=1)


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


async def test_a_coroutine_from_a_foreign_thread_is_closed() -> None:
    async def job() -> None:
        pass

    coro = job()
    async with open_background_runtime() as runtime:
        handle = runtime.handle()

        def foreign() -> None:
            with pytest.raises(RuntimeError):
                handle.spawn(coro)  # type: ignore[arg-type]

        await trio.to_thread.run_sync(foreign)
    assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"


def test_spawn_at_the_recursion_limit_changes_nothing_when_it_raises() -> None:
    # Call spawn at every depth near the recursion limit, on the accepting path and the
    # rejecting one: each call either succeeded completely or changed nothing.
    problems: list[tuple[int, BackgroundStatistics, BackgroundStatistics]] = []

    async def main() -> None:
        class Quiet:
            def job_accepted(self, job: BackgroundJobMetadata) -> None:
                pass

            def job_rejected(self, job: BackgroundJobMetadata) -> None:
                pass

        config = BackgroundTaskConfig(max_queue_size=1, max_concurrent_tasks=1)
        async with open_background_runtime(config, instruments=[Quiet()]) as runtime:
            handle = runtime.handle()

            def at_depth(n: int) -> None:
                if n:
                    at_depth(n - 1)
                    return
                before = runtime.statistics()
                try:
                    handle.spawn(trio.sleep_forever)
                except QueueFullError:
                    after = runtime.statistics()
                    if after.rejected != before.rejected + 1:
                        problems.append((n, before, after))
                except RecursionError:
                    after = runtime.statistics()
                    if after != before:
                        problems.append((n, before, after))

            limit = sys.getrecursionlimit()
            for depth in range(limit - 200, limit):
                with contextlib.suppress(RecursionError):
                    at_depth(depth)
            raise _Stop

    with pytest.raises(_Stop):
        trio.run(main)
    assert not problems


class _Stop(Exception):
    pass


async def test_a_queued_job_whose_task_cannot_start_fails_and_the_slot_goes_on(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # At the hand-off, starting "b"'s task raises MemoryError: "b" counts failed (logged),
    # and the slot passes on to "c", which runs.
    real = trio.Nursery.start_soon
    starts = 0

    def start_soon(self: trio.Nursery, *args: Any, **kwargs: Any) -> None:
        nonlocal starts
        if kwargs.get("name") == "trio_background job":
            starts += 1
            if starts == 2:
                raise MemoryError("no room for a task")
        real(self, *args, **kwargs)

    monkeypatch.setattr(trio.Nursery, "start_soon", start_soon)
    ran: list[str] = []

    async def job(name: str) -> None:
        await trio.sleep(1)
        ran.append(name)

    recorder = Recorder()
    config = BackgroundTaskConfig(max_concurrent_tasks=1)
    async with open_background_runtime(config, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        for name in "abc":
            handle.spawn(job, name, name=name)
    assert ran == ["a", "c"]
    assert all_counts(runtime.statistics()) == expected(completed=2, failed=1)
    assert ("finished", "b", "failed", 0.0) in recorder.calls
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == "background job 'b' failed: its task could not be started"
    assert isinstance(exc_of(error), MemoryError)
