"""Bad input and misuse: every wrong argument is refused at once and leaves no trace.

Each test that calls into a live runtime proves that nothing was accepted or
counted: ``statistics()`` is equal before and after the bad call, and no
instrument hook fired. The table in ``docs/reliability.rst`` lists these tests.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from helpers import Recorder, all_counts, expected, sleeper

from trio_background import (
    BackgroundHandle,
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


# -- BackgroundTaskConfig --------------------------------------------------------------------


# -- BackgroundJobMetadata ------------------------------------------------------------------


# -- open_background_runtime ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"config": "x"}, r"^config must be a BackgroundTaskConfig or None, not str$"),
        ({"config": {"max_queue_size": 1}}, r"^config must be a BackgroundTaskConfig or None"),
        ({"instruments": 5}, r"^instruments must be an iterable of instruments, not int$"),
        ({"instruments": "abc"}, r"^instruments must be an iterable of instruments"),
    ],
)
async def test_open_runtime_rejects_bad_arguments(kwargs: dict[str, Any], pattern: str) -> None:
    recorder = Recorder()
    entered = False
    args: dict[str, Any] = {"instruments": [recorder], **kwargs}
    with pytest.raises(TypeError, match=pattern):
        async with open_background_runtime(**args):
            entered = True  # pragma: no cover
    assert not entered
    assert recorder.calls == []


async def test_instrument_without_hooks_is_accepted() -> None:
    # Objects need not subclass BackgroundInstrument: missing hooks are skipped.
    async with open_background_runtime(CONFIG, instruments=[object()]) as runtime:
        runtime.handle().spawn(trio.lowlevel.checkpoint)
    assert all_counts(runtime.statistics()) == expected(completed=1)


# -- spawn / send: bad arguments ------------------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "send"])
async def test_submit_rejects_coroutine_object(method: str) -> None:
    coro = sleeper(1.0)
    try:
        error = await assert_refused(
            lambda handle: submit(handle, method, coro),
            TypeError,
            rf"^{method}\(\) expects an async function, not a coroutine object",
        )
    finally:
        coro.close()  # never awaited on purpose; closing avoids the RuntimeWarning
    assert "pass the function" in str(error)


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
        (0, "timeout must be > 0, got 0"),
        (0.0, "timeout must be > 0, got 0.0"),
        (-1, "timeout must be > 0, got -1"),
        (-0.5, "timeout must be > 0, got -0.5"),
        (-math.inf, "timeout must be > 0, got -inf"),
        (math.nan, "timeout must not be NaN"),
    ],
)
async def test_submit_rejects_timeout_out_of_range(method: str, value: float, message: str) -> None:
    # A plain ValueError, as for the config (not a private class that is also a TypeError).
    error = await assert_refused(
        lambda handle: submit(handle, method, sleeper, 1.0, timeout=value),
        ValueError,
        rf"^{message}$",
    )
    assert type(error) is ValueError


async def test_infinite_timeout_means_no_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with open_background_runtime(CONFIG) as runtime:
        handle = runtime.handle()
        handle.spawn(sleeper, 1e6, timeout=math.inf)
        await handle.send(sleeper, 2e6, timeout=math.inf)
        await runtime.wait_idle()
    assert all_counts(runtime.statistics()) == expected(completed=2)
    assert trio.current_time() == 2e6


# -- the thread rule ------------------------------------------------------------------------


async def test_spawn_from_foreign_thread_is_refused() -> None:
    def in_thread(handle: BackgroundHandle) -> None:
        handle.spawn(sleeper, 1.0)

    await assert_refused(
        lambda handle: trio.to_thread.run_sync(in_thread, handle),
        RuntimeError,
        r"trio\.from_thread\.run_sync",
    )


async def test_spawn_from_another_trio_run_is_refused() -> None:
    # Another Trio loop in another thread is just as foreign as a plain thread.
    async def in_other_loop(handle: BackgroundHandle) -> None:
        handle.spawn(sleeper, 1.0)

    await assert_refused(
        lambda handle: trio.to_thread.run_sync(trio.run, in_other_loop, handle),
        RuntimeError,
        r"trio\.from_thread\.run_sync",
    )


async def test_send_from_another_trio_run_is_refused() -> None:
    async def in_other_loop(handle: BackgroundHandle) -> None:
        await handle.send(sleeper, 1.0)

    await assert_refused(
        lambda handle: trio.to_thread.run_sync(trio.run, in_other_loop, handle),
        RuntimeError,
        r"trio\.from_thread\.run_sync",
    )


async def test_from_thread_run_sync_is_the_way_in() -> None:
    # The control for the three tests above: the advised call is accepted.
    recorder = Recorder()
    async with open_background_runtime(CONFIG, instruments=[recorder]) as runtime:
        handle = runtime.handle()

        def in_thread() -> None:
            trio.from_thread.run_sync(functools.partial(handle.spawn, sleeper, 0.0, name="t"))

        await trio.to_thread.run_sync(in_thread)
    assert all_counts(runtime.statistics()) == expected(completed=1)
    assert recorder.pairs() == [("accepted", "t"), ("started", "t"), ("finished", "t")]


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


# -- calls that would wait for themselves ---------------------------------------------------


async def test_wait_idle_from_a_job_raises_at_once(autojump_clock: trio.testing.MockClock) -> None:
    errors: list[BaseException] = []
    snapshots: list[tuple[BackgroundStatistics, BackgroundStatistics]] = []
    async with open_background_runtime(CONFIG) as runtime:

        async def waits_for_itself() -> None:
            before = runtime.statistics()
            try:
                await runtime.wait_idle()
            except RuntimeError as exc:
                errors.append(exc)
            snapshots.append((before, runtime.statistics()))
            await trio.sleep(1.0)

        runtime.handle().spawn(waits_for_itself)
        await runtime.wait_idle()  # fine from the body
        assert trio.current_time() == 1.0
    assert len(errors) == 1
    assert "would wait for itself" in str(errors[0])
    [(before, after)] = snapshots
    assert before == after
    assert all_counts(runtime.statistics()) == expected(completed=1)
